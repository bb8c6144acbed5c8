"""Runs a pdserve module as __main__ and, at exit, reports which heavy modules it had imported:
`python import_probe.py pdserve.services.router [flags]` -> "IMPORTED: [...]" on stderr."""

import atexit
import runpy
import sys

HEAVY = ("torch", "numpy", "transformers", "triton")


def report() -> None:
    print("IMPORTED:", sorted(m for m in HEAVY if m in sys.modules), file=sys.stderr, flush=True)


atexit.register(report)
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
