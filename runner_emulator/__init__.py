"""Drives a custom-executor driver exactly as GitLab Runner does (tests, demo)."""
