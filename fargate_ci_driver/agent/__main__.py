"""`python -m fargate_ci_driver.agent`: the session agent process (`server.main`)."""

import sys

from fargate_ci_driver.agent.server import main

sys.exit(main())
