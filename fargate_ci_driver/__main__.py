"""`python -m fargate_ci_driver ...` is the same as the `fargate-driver` console script."""

from fargate_ci_driver.cli import main

raise SystemExit(main())
