"""`pdserve up` as a user runs it: Redis, one prefill, one decode and the router as real processes,
flags passed through to the workers and the router, an OpenAI client request, clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai

from redis_server import free_port


def test_up_starts_a_working_stack_and_passes_flags(tiny_models):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.services.cli", "up", "--prefill", "1", "--decode", "1", "--port", str(port),
         "--model", tiny_models["llama"], "--worker-args", "--num-gpu-blocks-override 256",
         "--kv-transport", "nccl", "--decode-args", "--lease-ttl 20",
         "--router-args", "--routing round_robin --disagg-min-prompt-tokens 0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.time() + 240
        while not any(line.startswith("router") for line in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines)
            lines.append(proc.stdout.readline())
        base = f"http://127.0.0.1:{port}"
        while True:  # the router process is starting
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline
            time.sleep(0.3)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        out = client.completions.create(model=client.models.list().data[0].id, prompt="The city of",
                                        max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5
        stats = httpx.get(base + "/admin/stats", timeout=5).json()
        assert stats["routing"] == "round_robin"  # --router-args reached the router
        assert stats["handoffs"] == 1  # --disagg-min-prompt-tokens 0: even this short prompt was prefilled
        assert sum(1 for line in lines if line.startswith(("prefill", "decode"))) == 2
        # --kv-transport nccl (gloo on CPU) moved that prompt's KV
        assert any(line.startswith("prefill") and " kv=nccl://" in line for line in lines), lines
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def test_up_device_lists_need_one_gpu_id_per_worker():
    from pdserve.common.config import ConfigError
    from pdserve.services.disagg_cli import worker_devices
    assert worker_devices(None, 2, "--decode-devices") == [None, None]
    assert worker_devices("0, 3", 2, "--decode-devices") == ["0", "3"]
    for bad in ("0", "0,1,2", "cuda:0,1"):
        try:
            worker_devices(bad, 2, "--decode-devices")
        except ConfigError as e:
            assert "--decode-devices must list one GPU id per worker (2)" in str(e)
        else:
            raise AssertionError(f"{bad!r} accepted")
