"""python -m pdserve.services.prefill ...: a worker registered as prefill (services/worker/process.py)."""

import sys

from pdserve.services.worker.process import main

sys.exit(main("prefill"))
