"""python -m pdserve.services.prefill ...: a worker registered as prefill (services/worker/process.py)."""

from pdserve.services.entry import exit_process
from pdserve.services.worker.process import main

exit_process(main("prefill"))
