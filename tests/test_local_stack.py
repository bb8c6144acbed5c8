"""`pdserve up`'s restart policy (services/local_stack.py) on stand-in processes: a worker that
crashes after it was ready is started again with the same arguments and announced again once
ready; one that keeps crashing waits longer each time; `--restart no` stops on the first exit.
tests/e2e/test_up.py kills a real decode worker of a real stack."""

from __future__ import annotations

import io
import sys
import time

import pytest

from pdserve.services import local_stack
from pdserve.services.local_stack import LocalStack, StackError

# run k of this stand-in (k counted in a file): writes its ready file, then exits with status 3
# while k < CRASHES, else stays up
WORKER = """
import os, sys, time
count, ready, crashes = sys.argv[1], sys.argv[sys.argv.index("--ready-file") + 1], int(sys.argv[2])
k = int(open(count).read()) if os.path.exists(count) else 0
open(count, "w").write(str(k + 1))
open(ready + ".tmp", "w").write(f"grpc-{k} kv-{k} metrics-{k}")
os.replace(ready + ".tmp", ready)
if k < crashes:
    time.sleep(0.05)
    sys.exit(3)
time.sleep(60)
"""


def supervise_until(stack: LocalStack, done, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, stack.out.getvalue()
        stack.supervise()
        time.sleep(0.02)


def start(stack: LocalStack, tmp_path, crashes: int) -> str:
    ready = str(tmp_path / "decode-0.ready")
    stack.spawn("worker", "decode-0", [sys.executable, "-c", WORKER, str(tmp_path / "count"), str(crashes),
                                       "--ready-file", ready])
    stack.worker_line = lambda name, words: f"decode   {name} grpc={words[0]}"
    return ready


def test_a_crashed_worker_is_restarted_with_its_arguments_and_announced_again(tmp_path, monkeypatch):
    monkeypatch.setattr(local_stack, "RESTART_FIRST_S", 0.05)
    stack = LocalStack(out=io.StringIO())
    try:
        start(stack, tmp_path, crashes=1)
        supervise_until(stack, lambda: "(restarted)" in stack.out.getvalue())
        lines = stack.out.getvalue().splitlines()
        assert lines[0] == "pdserve up: decode-0 exited with status 3; restarting it in 0.05 s"
        assert lines[1].startswith("pdserve up: restarted decode-0 (pid ")
        assert lines[2] == "decode   decode-0 grpc=grpc-1 (restarted)"  # the new process's ready file
        (_, name, proc), = stack.children  # the restarted process replaced the crashed one
        assert name == "decode-0" and proc.poll() is None and stack.num_restarts == 1
        assert str(proc.pid) in lines[1]
    finally:
        stack.stop()
    assert proc.poll() is not None  # stop() reached the restarted process


def test_a_worker_that_keeps_crashing_waits_longer_each_time(tmp_path, monkeypatch):
    monkeypatch.setattr(local_stack, "RESTART_FIRST_S", 0.05)
    stack = LocalStack(out=io.StringIO())
    try:
        start(stack, tmp_path, crashes=3)
        supervise_until(stack, lambda: stack.num_restarts == 3 and "(restarted)" in stack.out.getvalue().splitlines()[-1])
        delays = [line.rsplit(" in ", 1)[1] for line in stack.out.getvalue().splitlines() if "exited" in line]
        assert delays == ["0.05 s", "0.1 s", "0.2 s"]
        assert stack.children[0][2].poll() is None  # the fourth run stays up
    finally:
        stack.stop()


def test_restart_no_stops_on_the_first_exit(tmp_path):
    stack = LocalStack(restart="no", out=io.StringIO())
    try:
        start(stack, tmp_path, crashes=1)
        with pytest.raises(StackError, match=r"^decode-0 exited with status 3$"):
            stack.run_until_stopped()
        assert stack.num_restarts == 0
    finally:
        stack.stop()
