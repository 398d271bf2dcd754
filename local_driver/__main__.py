"""`python -m local_driver ...` is the same as the `fargate-driver` console script."""

from local_driver.cli import main

raise SystemExit(main())
