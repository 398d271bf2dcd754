"""`python -m local_driver.agent`: the session agent process (`server.main`)."""

import sys

from local_driver.agent.server import main

sys.exit(main())
