"""python -m pdserve.services.decode ...: a worker registered as decode (services/worker/process.py)."""

import sys

from pdserve.services.worker.process import main

sys.exit(main("decode"))
