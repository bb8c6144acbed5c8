"""A `pdserve up` (or `pdserve serve`) stack that a benchmark starts, waits for and stops, never
waiting without a deadline and never leaving a process behind.

    Stack(name, argv, url, num_instances, log_dir, echo=...)
      the `up` process in its own session, SIGTERM'd if this process dies (PR_SET_PDEATHSIG);
      a reader thread takes its output (`up`'s status lines and every child's stderr):
        each line -> stack-NAME.log, and with echo also stdout as "[NAME] line" (flushed, so a
        run cut by a time limit still shows how far each stack got)
        `up`'s status lines ("redis ...", "prefill  prefill-0 grpc=...", "router ...") -> `ready`
    wait_ready(timeout_s)
      until the router lists num_instances instances (`serve`: answers /v1/models); at the
      deadline, or when `up` exits first: StackNotReady naming the stack and the processes that
      had not come up, with every pdserve process's Python stacks (SIGUSR1: services/entry.py)
      and the log's tail; the stack is stopped first
    stop(grace_s)
      SIGINT to `up`, which stops its processes in order; after grace_s SIGKILL to every process
      of the tree that is left
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from pdserve.services.local_stack import _die_with_parent

STATUS_PREFIXES = ("redis", "prefill", "decode", "router")  # `pdserve up` status lines (local_stack.py)
STACK_DUMP_WAIT_S = 2.0  # how long the processes get to write their stacks


class StackNotReady(RuntimeError):
    """A stack did not come up in time, or a process of it exited; the message says which."""


class Stack:
    """`pdserve up` (or `pdserve serve`) as a process tree; ready when the router lists them all."""

    def __init__(self, name: str, argv: list[str], url: str, num_instances: int, log_dir: str,
                 env: dict | None = None, echo: bool = False, expected: list[str] | None = None):
        """num_instances: workers the router must list (0: `pdserve serve`, ready on /v1/models).
        expected: the processes `up` announces (e.g. ["redis", "prefill-0", "decode-0", "router"]),
        to name those missing when it does not come up."""
        self.name, self.url, self.num_instances = name, url, num_instances
        self.expected = expected or []
        self.ready: list[str] = []  # processes `up` announced as started, in order
        self.echo = echo
        self.log_path = os.path.join(log_dir, f"stack-{name}.log")
        self._log = open(self.log_path, "w")
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "pdserve.services.cli", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, bufsize=1,
                                     errors="replace", preexec_fn=_die_with_parent,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self._reader = threading.Thread(target=self._read, name=f"stack-{name}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            words = line.split()
            if words and words[0] in STATUS_PREFIXES:
                self.ready.append(words[1] if words[0] in ("prefill", "decode") else words[0])
            with self._lock:
                if not self._log.closed:
                    self._log.write(line + "\n")
                    self._log.flush()
            if self.echo:
                print(f"[{self.name}] {line}", flush=True)

    def wait_ready(self, timeout_s: float = 300) -> float:
        """Seconds from the start until ready; StackNotReady (the stack stopped) otherwise."""
        import httpx
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.num_instances == 0:  # pdserve serve
                    if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                        return time.monotonic() - self.started
                else:
                    stats = httpx.get(self.url + "/admin/stats", timeout=2).json()
                    if len(stats["instances"]) == self.num_instances:
                        return time.monotonic() - self.started
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        exited = self.proc.poll()
        # what was up at the deadline, before the stacks' dump gives the processes more time
        ready = list(self.ready)
        missing = [p for p in self.expected if p not in ready]
        if exited is None:
            self.dump_stacks()
        why = (f"exited with status {exited}" if exited is not None
               else f"did not come up within {timeout_s:g} s")
        self.stop(grace_s=10)
        not_up = ", ".join(missing) if missing else "none missing, but the router did not list every worker"
        raise StackNotReady(f"stack {self.name} {why}; not up: {not_up} (up: {', '.join(ready) or 'nothing'});"
                            f" log {self.log_path}, its tail:\n{self.tail(4000)}")

    def tail(self, num_chars: int) -> str:
        with self._lock:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-num_chars:]

    def dump_stacks(self) -> None:
        """Every pdserve process of the stack writes its threads' Python stacks into the log."""
        for pid in process_tree(self.proc.pid):
            if b"pdserve" in _read_proc(pid, "cmdline"):
                _signal(pid, signal.SIGUSR1)
        time.sleep(STACK_DUMP_WAIT_S)

    def stop(self, grace_s: float = 60) -> None:
        """SIGINT to `up` (it stops its processes in order), SIGKILL to what is left after grace_s."""
        tree = [(pid, _start_time(pid)) for pid in process_tree(self.proc.pid)]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        tree += [(pid, _start_time(pid)) for pid in process_tree(self.proc.pid)]  # started meanwhile
        for pid, start in tree:
            if start is not None and _start_time(pid) == start:  # still that process, not a reused pid
                _signal(pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(timeout=5)
        with self._lock:
            self._log.close()


def process_tree(root: int) -> list[int]:
    """root and every process below it (workers, tensor-parallel ranks, router, Redis), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_proc(int(entry), "stat")
            if stat:  # "pid (comm) state ppid ...": comm may hold spaces and parentheses
                children.setdefault(int(stat.rpartition(b")")[2].split()[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat); None once it is gone."""
    stat = _read_proc(pid, "stat")
    return int(stat.rpartition(b")")[2].split()[19]) if stat else None


def _read_proc(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:  # gone meanwhile
        return b""


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
