"""The orchestrator: starts, tracks and stops one Fargate task per GitLab CI job."""
