"""fargate-driver: the GitLab Runner custom-executor driver that runs each CI job in its own Fargate task."""

DRIVER_NAME = "fargate-ci"
__version__ = "0.1.0"
