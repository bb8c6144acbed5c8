"""python -m pdserve.services.router ...: see services/router/main.py."""

from pdserve.services.entry import exit_process
from pdserve.services.router.main import main

exit_process(main())
