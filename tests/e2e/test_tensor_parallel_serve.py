"""`pdserve serve --tensor-parallel-size 2` as a user runs it, through the official openai client:
the same greedy completion as TP=1, the world size in /metrics; when a rank process dies the instance says it is unhealthy
and a request fails fast with a clear error (nothing hangs); and the CLI's one-line error for a
size that does not split the model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from servers import ServeProcess  # noqa: E402

GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True})


def complete(url: str, prompt: str) -> openai.types.Completion:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    return client.completions.create(model="llama", prompt=prompt, **GREEDY)


def test_serve_tp2_then_a_rank_dies(tiny_models):
    common = ("--model", tiny_models["llama"], "--kv-cache-memory", "0.05", "--served-model-name", "llama")
    tp2, tp1 = ServeProcess(*common, "--tensor-parallel-size", "2").start(), ServeProcess(*common).start()
    try:
        tp1.wait_ready()
        tp2.wait_ready()
        want = complete(tp1.url, "The weather today is")
        got = complete(tp2.url, "The weather today is")
        assert got.choices[0].text == want.choices[0].text and got.usage.completion_tokens == 8
        metrics = httpx.get(tp2.url + "/metrics").text
        assert 'pdserve:tensor_parallel_size{model_name="llama"} 2.0' in metrics
        assert 'pdserve:kv_blocks_fit{model_name="llama",rank="1"}' in metrics

        workers = psutil.Process(tp2.proc.pid).children()
        assert len(workers) == 1  # rank 1; rank 0 is the serving process itself
        os.kill(workers[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(tp2.url + "/health").status_code == 200:  # idle: noticed within a second
            assert time.monotonic() < deadline, "the instance still says it is healthy"
            time.sleep(0.1)
        started = time.monotonic()
        try:
            complete(tp2.url, "Hello")
            raise AssertionError("a request to a dead instance succeeded")
        except openai.APIStatusError as e:
            assert e.status_code == 503 and "tensor-parallel rank 1" in str(e), e
        assert time.monotonic() - started < 5
    finally:
        tp1.close()
        assert tp2.stop() == 0
        tp2.close()


def test_cli_rejects_a_size_that_does_not_split(tmp_path, tiny_models):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n")
    proc = subprocess.run([sys.executable, "-m", "pdserve.services.cli", "generate", "--model", tiny_models["llama"],
                           "--input", str(prompts), "-tp", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tensor-parallel-size 3 cannot split" in lines[0], proc.stderr
