"""`pdserve prefill | decode | router | up`: the disaggregated services and a local stack.

    pdserve up --prefill 1 --decode 1      redis-server + 1 prefill + 1 decode + router, as real
                                           processes (mirrors compose/): services/local_stack.py
"""

from __future__ import annotations

import functools


def add_parsers(sub, add_engine_args) -> None:
    from pdserve.services.worker.args import add_worker_args
    for role in ("prefill", "decode"):
        p = sub.add_parser(role, help=f"run a {role} worker (gRPC + KV transport, registers in Redis)")
        add_worker_args(p)
        add_engine_args(p)
        p.set_defaults(func=functools.partial(cmd_worker, role))

    from pdserve.services.router.main import add_router_args, run_router
    p = sub.add_parser("router", help="OpenAI API over the prefill/decode instances registered in Redis")
    add_router_args(p)
    p.set_defaults(func=run_router)

    from pdserve.services import plan
    from pdserve.services.router import admin_cli
    admin_cli.add_parser(sub)
    plan.add_parser(sub, add_engine_args)

    from pdserve.services.local_stack import add_up_args, cmd_up
    p = sub.add_parser("up", help="start a local disaggregated stack (Redis, prefill, decode, router)")
    add_up_args(p)
    p.set_defaults(func=cmd_up)


def cmd_worker(role: str, args) -> None:
    from pdserve.services.worker.process import run_worker
    run_worker(args, role)
