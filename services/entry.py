"""The one shape of a service's `main`: parse flags, run, and turn a user error into one line.

Every user error (ConfigError: a bad flag or model; ParameterError: a bad sampling parameter)
ends in one line on stderr and exit status 2; Ctrl-C ends with 130. SIGUSR1 writes every thread's
Python stack to stderr and the process goes on (a benchmark whose stack does not come up asks
each process where it waits). The open-files limit is raised to its hard limit: a server holds
one socket per open stream (the router at 100 req/s of long streams: ~1,000), and Linux's usual
soft limit is 1,024. The garbage collector's first generation is collected less often
(common/gc_policy.py). Torch-free.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import resource
import signal
import sys
from typing import Callable, NoReturn

from pdserve.common.config import ConfigError
from pdserve.common.gc_policy import freeze_startup_objects, tune_gc
from pdserve.common.sampling_params import ParameterError

USER_ERRORS = (ConfigError, ParameterError, FileNotFoundError, IsADirectoryError)


def run_main(prog: str, description: str, add_args: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], None], argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pdserve.common.config import HelpFormatter
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_args(parser)
    return run_parsed(prog, run, parser.parse_args(argv))


def exit_process(code: int) -> NoReturn:
    """End a service's process with `code` (its entry point's last call, never inside a caller's
    process). Where Triton was imported the interpreter's teardown is skipped, once stdout, stderr
    and the logs are flushed: Triton's nanobind bindings report their module objects, which live
    until then, as ~60 lines of "nanobind: leaked ..." on every stop of a server, which operators
    read as a fault. Everything the service owns is closed by then (its `run` has returned)."""
    if "triton" not in sys.modules:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # (a closed pipe)
            pass
    os._exit(code)


def run_parsed(name: str, run: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    dump_stacks_on_sigusr1()
    raise_open_files_limit()
    tune_gc()
    try:
        run(args)
    except USER_ERRORS as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def latch_stop_signals() -> Callable[[], bool]:
    """SIGINT / SIGTERM only set a flag (the returned function reads it) until uvicorn serves.

    uvicorn takes both signals while it serves and re-raises them once it has stopped: the latch
    makes that re-raise a no-op, so the caller's clean-up always runs. One that arrives before uvicorn
    took them (the service still connects or starts) must still stop it: the service polls the flag
    until its server has started and then sets `server.should_exit`.
    """
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    return lambda: bool(received)


async def until_serving(server, task, stop_requested: Callable[[], bool]) -> bool:
    """Wait until uvicorn's `server` (serving in `task`) listens or its task ends; a stop signal
    latched meanwhile (`stop_requested`, from latch_stop_signals) makes it exit. -> whether it
    listens; then the start-up's objects are frozen out of the collector's way (gc_policy.py)."""
    while not server.started and not task.done():
        server.should_exit |= stop_requested()  # a stop signal before uvicorn took them
        await asyncio.sleep(0.01)
    if server.started:
        freeze_startup_objects()
    return server.started


def dump_stacks_on_sigusr1() -> None:
    """SIGUSR1 -> every thread's Python stack on the process's stderr (fd 2, whatever sys.stderr
    is replaced by meanwhile: a test's capture has no file descriptor)."""
    if sys.__stderr__ is not None:  # a process started without a stderr has nowhere to write them
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)


def raise_open_files_limit() -> int:
    """Soft RLIMIT_NOFILE -> the hard limit (capped at 1M); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(1 << 20, hard) if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as e:
        logging.getLogger(__name__).warning("could not raise the open-files limit from %d to %d: %s", soft, want, e)
        return soft
    return want
