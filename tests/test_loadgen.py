"""`pdserve bench serve` (services/loadgen.py) against a real `pdserve serve` of the tiny model:
the CLI with a rate sweep and token-id prompts, text prompts from JSONL, failed requests, and
the workload/metric helpers."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from servers import ServeProcess

from pdserve.services import loadgen


@pytest.fixture(scope="module")
def served(tiny_models):
    proc = ServeProcess("--model", tiny_models["llama"], "--num-gpu-blocks-override", "256",
                        "--max-model-len", "256", "--served-model-name", "tiny")
    with proc:
        yield proc


def test_bench_serve_sweeps_rates_with_token_id_prompts(served, tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve.services.cli", "bench", "serve", "--base-url", served.url + "/v1",
         "--num-prompts", "6", "--request-rates", "40", "inf", "--max-concurrency", "4",
         "--random-input-len", "24", "--random-output-len", "6", "--random-range-ratio", "0.5",
         "--random-vocab-size", "49152", "--goodput", "ttft:60000", "tpot:60000", "--seed", "3",
         "--client-processes", "2", "--output-json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and [r["request_rate"] for r in report["runs"]] == [40.0, "inf"]
    workload = loadgen.random_requests(6, 24, 6, 0.5, 49152, seed=3)
    for run in report["runs"]:
        assert run["completed"] == 6 and run["failed"] == 0
        # ignore_eos: every request produced exactly the asked number of tokens
        assert run["total_output_tokens"] == sum(r.output_len for r in workload)
        assert run["total_input_tokens"] == sum(r.prompt_len for r in workload)
        # throughputs and durations are rounded in the report: equal to about 1 percent
        assert run["input_throughput"] * run["duration_s"] == pytest.approx(run["total_input_tokens"], rel=1e-2)
        for name in ("ttft", "tpot", "itl", "e2el"):
            assert 0 < run[f"p50_{name}_ms"] <= run[f"p90_{name}_ms"] <= run[f"p99_{name}_ms"]
        assert run["p99_ttft_ms"] <= run["p99_e2el_ms"]
        assert run["slo_attainment"] == 1.0 and run["goodput"] == run["request_throughput"]
    assert "rate -> goodput: 40.0 -> " in proc.stdout and "TTFT" in proc.stdout


def test_client_processes_keep_request_order_and_arrivals(served):
    """Two client processes: request i's result comes back at index i (its own output length),
    and the sends follow the one arrival schedule (the run lasts at least its last arrival)."""
    requests = [loadgen.WorkloadRequest(list(range(100, 110 + i)), 2 + i % 4, 10 + i) for i in range(7)]
    results, wall = loadgen.run_load_processes(served.url, "tiny", requests, 20.0, None, seed=5, processes=2)
    assert [r.ok for r in results] == [True] * 7, [r.error for r in results]
    assert [r.output_tokens for r in results] == [r.output_len for r in requests]
    assert [r.prompt_tokens for r in results] == [r.prompt_len for r in requests]
    assert wall >= loadgen.arrival_offsets(7, 20.0, seed=5)[-1]
    bad = subprocess.run([sys.executable, "-m", "pdserve.services.cli", "bench", "serve", "--base-url", served.url,
                          "--client-processes", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--client-processes must be at least 1" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_text_prompts_strict_slos_and_failed_requests(served, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "The history of the city", "output_len": 5}\n\n{"prompt": "A list of fruits:"}\n')
    requests = loadgen.jsonl_requests(str(path), num=10, output_len=3)
    assert [r.output_len for r in requests] == [5, 3]
    results, wall = asyncio.run(loadgen.run_load(served.url, "tiny", requests, math.inf, None, seed=0))
    assert all(r.ok for r in results) and [r.output_tokens for r in results] == [5, 3]
    assert all(r.prompt_tokens > 0 for r in results)  # from the usage chunk
    assert len(results[0].itl_s) >= 1 and results[0].tpot_s > 0
    strict = loadgen.summarize(results, wall, {"ttft": 1e-6}, math.inf, None)
    assert strict["goodput"] == 0 and strict["slo_attainment"] == 0 and strict["completed"] == 2
    # A model the server does not serve: every request fails and none counts as a latency.
    bad, wall = asyncio.run(loadgen.run_load(served.url, "no-such-model", requests, 100.0, 1, seed=0))
    summary = loadgen.summarize(bad, wall, {}, 100.0, 1)
    assert summary["failed"] == 2 and summary["completed"] == 0 and summary["mean_ttft_ms"] == 0
    assert summary["errors"][0].startswith("HTTP 404")


def test_workload_and_metric_helpers():
    requests = loadgen.random_requests(200, 100, 10, 0.5, 1000, seed=1)
    assert {len(r.prompt) == r.prompt_len for r in requests} == {True}
    assert min(r.prompt_len for r in requests) >= 50 and max(r.prompt_len for r in requests) <= 150
    assert all(100 <= t < 1000 for r in requests for t in r.prompt)
    assert loadgen.random_requests(3, 8, 4, 0.0, 1000, seed=1)[0].prompt_len == 8
    offsets = loadgen.arrival_offsets(4000, 20.0, seed=2)
    assert offsets == sorted(offsets) and offsets[-1] / 4000 == pytest.approx(1 / 20, rel=0.05)
    assert loadgen.arrival_offsets(3, math.inf, seed=2) == [0.0, 0.0, 0.0]
    values = [5.0, 1.0, 9.0, 2.0, 7.0]
    for q in (0, 50, 90, 99, 100):
        assert loadgen.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert loadgen.parse_goodput(["ttft:1000", "tpot:25"]) == {"ttft": 1.0, "tpot": 0.025}
    for bad in (["ttft"], ["itl:5"], ["tpot:-1"], ["e2el:x"]):
        with pytest.raises(ValueError, match="--goodput takes METRIC:MS"):
            loadgen.parse_goodput(bad)
    with pytest.raises(ValueError, match="--random-range-ratio"):
        loadgen.random_requests(1, 8, 4, 1.0, 1000, seed=0)
