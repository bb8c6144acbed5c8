"""`pdserve router --workers N`: N router processes on one port.

One router process parses every decode message and writes every SSE event of its connections, so
its one core caps the streams one router can carry (docs/benchmarks.md, eighth session: ~60 % of a
core at 100 req/s of 256/128 through 1P1D on 2 x H200). With --workers N the parent picks the port, starts N
children (spawned: each a whole router with its own Redis clients, instance pool and decode
streams) that each bind it with SO_REUSEPORT, so the kernel spreads new connections over them,
and prints the ready lines once all listen. The routers share nothing but Redis (the fleet, the
prefix index), which is what a single router reads too.

    parent:  port -> spawn N children -> wait until each listens -> "ready" -> wait
    SIGTERM / SIGINT to the parent: SIGTERM to every child (each drains its open streams, as one
    router does, for --shutdown-grace), then the parent exits; a child still running TEARDOWN_S
    after that is killed (before, after a fixed 40 s: a --shutdown-grace above 30 s had its
    streams cut). A child that dies ends the others and the parent (exit 1): whatever supervises
    the router restarts it whole.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from pdserve.common.config import ConfigError
from pdserve.services.router.http_options import scheme

START_TIMEOUT_S = 120.0
TEARDOWN_S = 10.0  # a child's teardown after its graceful shutdown (--shutdown-grace)


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port that other processes may bind too (SO_REUSEPORT). proto
    IPPROTO_TCP: asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP
    (services/serve.py's _bind)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def run_workers(args: argparse.Namespace, child_main) -> None:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and event loops
    # /metrics: each child keeps its request metrics in files here and sums everyone's on a
    # scrape (prometheus_client's multiprocess mode, chosen at its import: set before the spawn)
    metrics_dir = tempfile.mkdtemp(prefix="pdserve-router-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _run_children(ctx, args, child_main, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_children(ctx, args: argparse.Namespace, child_main, metrics_dir: str) -> None:
    stop_timeout_s = args.shutdown_grace + TEARDOWN_S  # the children answer what is open, then are killed
    holder = None
    if args.port == 0:  # a free port, held (bound, not listening: it takes no connections) until all bind it
        holder = socket.socket(_family(args.host), socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((args.host, 0))
        args.port = holder.getsockname()[1]
    children = []
    for i in range(args.workers):
        child_args = argparse.Namespace(**{**vars(args), "workers": 1, "worker_of": str(i), "metrics_dir": metrics_dir,
                                              "parent_pid": os.getpid()})
        # a pipe, not an Event: an Event's set() waits for its waiters to wake, so a child that
        # listens just after a SIGKILLed parent began waiting would block in set() for good
        ready, ready_w = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child_main, args=(child_args, ready_w), name=f"pdserve-router-{i}", daemon=False)
        proc.start()
        ready_w.close()
        children.append((proc, ready))
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True
        for proc, _ in children:
            if proc.is_alive():
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deadline = time.monotonic() + START_TIMEOUT_S
    for i, (proc, ready) in enumerate(children):
        while not _listening(ready):
            if stopping:
                break
            if not proc.is_alive() or time.monotonic() > deadline:
                stop()
                _join(children, stop_timeout_s)
                raise ConfigError(f"router worker {i} failed to start (exit code {proc.exitcode})")
    if holder is not None:
        holder.close()
    if not stopping:
        print(f"pdserve router: ready ({args.workers} processes on the port)", flush=True)
        print(f"pdserve router serving on {scheme(args)}://{args.host}:{args.port} ({args.workers} workers)", flush=True)
    while not stopping:
        multiprocessing.connection.wait([proc.sentinel for proc, _ in children], timeout=0.5)
        dead = [(i, proc.exitcode) for i, (proc, _) in enumerate(children) if not proc.is_alive()]
        if dead and not stopping:
            print(f"pdserve router: worker {dead[0][0]} exited with code {dead[0][1]}; stopping the others",
                  file=sys.stderr, flush=True)
            stop()
            _join(children, stop_timeout_s)
            sys.exit(1)
    _join(children, stop_timeout_s)


def _listening(ready) -> bool:
    """Whether the child wrote its ready byte (waits up to 0.1 s); a child that died closes the
    pipe's end and reads as not ready, its exit code tells the rest."""
    if not ready.poll(0.1):
        return False
    try:
        return ready.recv_bytes() == b"1"
    except EOFError:
        time.sleep(0.1)
        return False


def _join(children, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc, _ in children:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)
