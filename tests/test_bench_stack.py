"""The benchmarks' stack handle (services/bench_stack.py) and what it leans on: a `pdserve up`
that does not come up in time is named process by process and leaves nothing behind; `up`
announces its workers as each gets ready and names every one still starting; a pdserve process
writes its threads' stacks on SIGUSR1 and goes on."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pdserve.services.bench_stack import Stack, StackNotReady, _start_time, process_tree
from pdserve.services.local_stack import LocalStack, StackError, free_port


def test_stack_not_up_in_time_names_what_is_missing_and_stops_every_process(tiny_models, tmp_path, capsys):
    port = free_port()
    stack = Stack("late", ["up", "--port", str(port), "--model", tiny_models["llama"], "--worker-args",
                           "--num-gpu-blocks-override 64 --dtype float32"], f"http://127.0.0.1:{port}", 2,
                  str(tmp_path), echo=True, expected=["redis", "prefill-0", "decode-0", "router"])
    deadline = time.monotonic() + 30
    while "redis" not in stack.ready or len(process_tree(stack.proc.pid)) < 4:  # up, redis, 2 workers
        assert time.monotonic() < deadline, stack.tail(2000)
        time.sleep(0.05)
    tree = [(pid, _start_time(pid)) for pid in process_tree(stack.proc.pid)]  # the workers take > 0.5 s
    with pytest.raises(StackNotReady) as err:
        stack.wait_ready(timeout_s=0.5)
    message = str(err.value)
    # a worker may announce itself inside the 0.5 s on a fast machine; the router starts only after
    # both, so it is always missing, and redis was up before the wait
    not_up, up = re.search(r"stack late did not come up within 0\.5 s; not up: (.*?) \(up: (.*?)\)",
                           message).groups()
    assert "router" in not_up.split(", ") and "redis" in up.split(", ")
    assert sorted(not_up.split(", ") + up.split(", ")) == ["decode-0", "prefill-0", "redis", "router"]
    assert not [pid for pid, start in tree if _start_time(pid) == start and not zombie(pid)]  # every one gone
    assert "[late] redis    redis://127.0.0.1:" in capsys.readouterr().out  # echoed as it came


def test_up_announces_ready_workers_in_any_order_and_names_all_still_starting(tmp_path):
    stack = LocalStack()
    try:
        files = [(name, str(tmp_path / f"{name}.ready")) for name in ("prefill-0", "decode-0", "decode-1")]
        with open(files[1][1], "w") as f:
            f.write("g k m\n")
        ready = stack.wait_ready_files(files, deadline=time.monotonic() + 0.3)
        assert next(ready) == ("decode-0", ["g", "k", "m"])  # before prefill-0, which is not ready
        with pytest.raises(StackError, match=r"^prefill-0, decode-1 did not start within"):
            next(ready)
    finally:
        stack.stop()


def test_sigusr1_writes_every_threads_stack_and_the_process_goes_on():
    code = ("import threading, time\n"
            "from pdserve.services.entry import run_parsed\n"
            "def waiting_here(args):\n"
            "    print('running', flush=True)\n"
            "    time.sleep(3)\n"
            "    print('done', flush=True)\n"
            "run_parsed('probe', waiting_here, None)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline() == "running\n"
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out == "done\n"
    assert "waiting_here" in err and "Current thread" in err


def zombie(pid: int) -> bool:
    """Exited, not yet reaped (by init, once its parent is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_a_pdserve_process_raises_its_open_files_limit():
    """A router with ~1,000 open streams needs more sockets than the usual soft limit of 1,024."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open-files limit is {hard}")
    code = ("import resource\n"
            "from pdserve.services.entry import run_parsed\n"
            "run_parsed('probe', lambda a: print(resource.getrlimit(resource.RLIMIT_NOFILE)[0]), None)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == (min(1 << 20, hard) if hard != resource.RLIM_INFINITY else 1 << 20)
