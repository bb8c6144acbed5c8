"""python -m pdserve.services.decode ...: a worker registered as decode (services/worker/process.py)."""

from pdserve.services.entry import exit_process
from pdserve.services.worker.process import main

exit_process(main("decode"))
