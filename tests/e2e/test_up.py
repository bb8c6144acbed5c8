"""`pdserve up` as a user runs it: Redis, one prefill, one decode and the router as real processes,
flags passed through, an OpenAI client request; stopped by SIGINT (even when started with SIGINT
ignored, as a script's background job is) or SIGTERM with no process left behind, every port
free, workers deregistered while Redis was still up, and no temporary folder left."""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import openai

from redis_server import free_port

START_S = 300


def start_up(*args: str, ignore_sigint: bool = False) -> subprocess.Popen:
    def preexec():
        os.setsid()  # the test signals `up` alone, never its group
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `cmd &` in a non-interactive shell
    return subprocess.Popen([sys.executable, "-m", "pdserve.services.cli", "up", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=preexec)


def read_until_ready(proc: subprocess.Popen) -> list[str]:
    return read_until(proc, lambda line: line.startswith("pdserve up: ready"))


def read_until(proc: subprocess.Popen, last) -> list[str]:
    """`up`'s output lines up to the first for which last(line) holds."""
    lines, deadline = [], time.time() + START_S
    while not any(last(line) for line in lines):
        line = proc.stdout.readline()
        assert line and time.time() < deadline, "".join(lines)
        lines.append(line)
    return lines


def child_running(pid: int, words: bytes) -> int:
    """The child of `pid` whose command line holds `words`."""
    for kid in children(pid):
        with open(f"/proc/{kid}/cmdline", "rb") as f:
            if words in f.read().replace(b"\0", b" "):
                return kid
    raise AssertionError(f"no child runs {words!r}")


def children(pid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def port_free(port: int) -> bool:
    """No socket listens on `port` (connections the servers closed may linger in TIME_WAIT)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return False
    return True


def ports_in(lines: list[str]) -> set[int]:
    return {int(p) for p in re.findall(r":(\d{2,5})(?:/|\s|$)", "".join(lines))}


def stop_and_check(proc: subprocess.Popen, sig: int, lines: list[str]) -> None:
    kids = children(proc.pid)
    assert len(kids) == 4, kids  # redis, prefill, decode, router
    ports = ports_in(lines)
    os.kill(proc.pid, sig)
    try:
        rest, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        for k in kids:
            os.kill(k, signal.SIGKILL)
        proc.kill()
        raise
    assert proc.returncode == 0, rest
    assert not [k for k in kids if alive(k)], "orphaned children"
    busy = [p for p in ports if not port_free(p)]
    assert not busy, f"ports still held: {busy}"


def test_up_serves_restarts_a_killed_worker_and_sigint_stops_it_even_when_inherited_ignored(tiny_models):
    tmp_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "pdserve-up-*")))
    port = free_port()
    proc = start_up("--prefill", "1", "--decode", "1", "--port", str(port), "--model", tiny_models["llama"],
                    "--worker-args", "--num-gpu-blocks-override 256", "--kv-transport", "nccl",
                    "--decode-args", "--lease-ttl 20",
                    "--router-args", "--routing round_robin --disagg-min-prompt-tokens 0", ignore_sigint=True)
    try:
        lines = read_until_ready(proc)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/health", timeout=5).status_code == 200  # answered before the ready line
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        out = client.completions.create(model=client.models.list().data[0].id, prompt="The city of",
                                        max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5
        stats = httpx.get(base + "/admin/stats", timeout=5).json()
        assert stats["routing"] == "round_robin"  # --router-args reached the router
        assert stats["handoffs"] == 1  # --disagg-min-prompt-tokens 0: even this short prompt was prefilled
        roles = [line.split()[0] for line in lines]  # workers are announced as each gets ready
        assert roles[0] == "redis" and sorted(roles[1:3]) == ["decode", "prefill"]
        assert roles[3:] == ["router", "pdserve"]
        prefill_line = next(line for line in lines if line.startswith("prefill"))
        assert " kv=nccl://" in prefill_line  # --kv-transport nccl (gloo on CPU) moved that prompt's KV

        # a worker killed once the stack is up is started again (--restart unless-stopped), the
        # rest of the stack keeps running, and the restarted worker serves
        os.kill(child_running(proc.pid, b" decode --instance-id decode-0 "), signal.SIGKILL)
        more = read_until(proc, lambda line: line.startswith("decode ") and line.rstrip().endswith("(restarted)"))
        assert more[0] == "pdserve up: decode-0 exited with status -9; restarting it in 1 s\n", more
        assert more[1].startswith("pdserve up: restarted decode-0 (pid "), more
        lines += more
        deadline = time.time() + 30
        while True:  # until the router has seen the new worker's registration
            try:
                out = client.completions.create(model=client.models.list().data[0].id, prompt="The city of",
                                                max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
                break
            except openai.InternalServerError:
                assert time.time() < deadline
                time.sleep(0.2)
        assert out.usage.completion_tokens == 5
        stop_and_check(proc, signal.SIGINT, lines)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "pdserve-up-*"))) <= tmp_before


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _monitor(port: int, seen: list[bytes], ready: threading.Event) -> None:
    """Redis MONITOR until the server goes away: every command Redis ran, in order."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"MONITOR\r\n")
        ready.set()
        while chunk := s.recv(65536):
            seen.append(chunk)


def test_up_sigterm_fixed_ports_workers_deregister_before_redis_stops(tiny_models):
    port, redis_port, base = free_port(), free_port(), free_port()
    while not all(_bindable(base + k) for k in (1, 2, 3)):
        base = free_port()
    proc = start_up("--prefill", "1", "--decode", "1", "--host", "127.0.0.1", "--port", str(port),
                    "--redis-port", str(redis_port), "--base-port", str(base), "--model", tiny_models["llama"],
                    "--kv-transfer-config", '{"kv_connector": "tcp", "kv_role": "kv_both"}',
                    "--decode-args", "--max-num-seqs 1")
    try:
        lines = read_until_ready(proc)
        assert f"redis://127.0.0.1:{redis_port}/0" in lines[0]
        worker = {line.split()[0]: line for line in lines[1:3]}  # announced in readiness order
        assert f"grpc=127.0.0.1:{base} " in worker["prefill"] and f":{base + 1}/metrics" in worker["prefill"]
        assert f"grpc=127.0.0.1:{base + 2} " in worker["decode"] and f":{base + 3}/metrics" in worker["decode"]
        assert "kv=tcp://" in worker["prefill"]
        seen: list[bytes] = []
        ready = threading.Event()
        monitor = threading.Thread(target=_monitor, args=(redis_port, seen, ready), daemon=True)
        monitor.start()
        ready.wait(5)
        # requests open longer than the router's 10 s before `up` kills it (the decode runs one at
        # a time): the router (--shutdown-grace 8 from `up`) answers them before, with
        # finish_reason abort; before, they were cut by the SIGKILL
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        reasons: list = []

        def long_request(i: int) -> None:
            try:
                if i % 2:
                    reasons.append(client.completions.create(model=model, prompt=f"Long {i}", max_tokens=900,
                                                             extra_body={"ignore_eos": True}).choices[0].finish_reason)
                else:
                    reasons.append([c.choices[0].finish_reason for c in client.completions.create(
                        model=model, prompt=f"Long {i}", max_tokens=900, stream=True, extra_body={"ignore_eos": True})
                        if c.choices and c.choices[0].finish_reason][-1])
            except Exception as e:
                reasons.append(e)
        threads = [threading.Thread(target=long_request, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        stop_and_check(proc, signal.SIGTERM, lines)
        for t in threads:
            t.join(10)
        assert len(reasons) == 12 and set(reasons) <= {"abort", "length"} and "abort" in reasons, reasons
        monitor.join(10)
        log = b"".join(seen).lower()
        for worker in (b"prefill-0", b"decode-0"):
            assert re.search(rb'"srem" "[^"]*instances" "' + worker + rb'"', log), log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_up_device_lists_need_one_gpu_id_per_worker():
    from pdserve.common.config import ConfigError
    from pdserve.services.local_stack import worker_devices
    assert worker_devices(None, 2, "--decode-devices") == [None, None]
    assert worker_devices("0, 3", 2, "--decode-devices") == ["0", "3"]
    for bad in ("0", "0,1,2", "cuda:0,1"):
        try:
            worker_devices(bad, 2, "--decode-devices")
        except ConfigError as e:
            assert "--decode-devices must list one GPU id per worker (2)" in str(e)
        else:
            raise AssertionError(f"{bad!r} accepted")
