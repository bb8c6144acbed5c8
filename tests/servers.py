"""Real HTTP servers for tests (no mocks): uvicorn on a free loopback port.

    with ThreadedServer(app) as srv:            # an ASGI app served from a thread of this process
        httpx.get(srv.url + "/health")          # (fast: torch and the model are already loaded)
    with ServeProcess("--model", path) as proc:  # `pdserve serve` as a user runs it (port 0: the
        proc.url; proc.stop() -> exit status     # port is read from its "pdserve serving" line)
    proc = ServeProcess(...).start()             # or start now (loads while other tests run) and
    proc.wait_ready()                            # wait later; proc.close() at the end

Tests elsewhere in the tree import this module by path (see tests/router/conftest.py).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time

START_DEADLINE_S = 120.0


class ThreadedServer:
    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn
        config = uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + START_DEADLINE_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


class ServeProcess:
    """`python -m pdserve.services.cli serve --port 0 ARGS...`; ready once it prints its URL."""

    def __init__(self, *args: str, env: dict | None = None):
        # float32 unless the test asks for a dtype: on a CPU with bf16 `--dtype auto` runs bf16, and
        # tests compare served outputs with other engines token for token
        dtype = () if "--dtype" in args else ("--dtype", "float32")
        self.args = [sys.executable, "-m", "pdserve.services.cli", "serve", "--port", "0", *dtype, *args]
        self.env = {**os.environ, **(env or {})}
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc: subprocess.Popen | None = None
        self.ready_line = ""
        self.lines: list[str] = []  # stdout up to and including the ready line
        self.url = ""

    def start(self) -> "ServeProcess":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=self.env)
        self.started_at = time.monotonic()
        self._lines: queue.Queue = queue.Queue()

        def read_stdout() -> None:
            for line in self.proc.stdout:
                self._lines.put(line)
            self._lines.put(None)
        threading.Thread(target=read_stdout, daemon=True).start()
        return self

    def wait_ready(self) -> "ServeProcess":
        deadline = self.started_at + START_DEADLINE_S
        while not self.url:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise RuntimeError(f"pdserve serve did not start:\n{self.stderr_text()}")
            self.lines.append(line.rstrip("\n"))
            if line.startswith("pdserve serving"):
                self.ready_line = line.strip()
                self.url = self.ready_line.rsplit(" ", 1)[1]
        return self

    def __enter__(self) -> "ServeProcess":
        return self.start().wait_ready()

    def more_lines(self, wait_s: float = 0.5) -> list[str]:
        """stdout lines printed after the ready line so far (waiting up to `wait_s` for the first)."""
        lines = []
        try:
            while True:
                line = self._lines.get(timeout=wait_s if not lines else 0.01)
                if line is None:
                    break
                lines.append(line.rstrip("\n"))
        except queue.Empty:
            pass
        self.lines += lines
        return lines

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def close(self) -> None:
        self.stop()
        self.stderr.close()

    def __exit__(self, *exc) -> None:
        self.close()
