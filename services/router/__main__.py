"""python -m pdserve.services.router ...: see services/router/main.py."""

import sys

from pdserve.services.router.main import main

sys.exit(main())
