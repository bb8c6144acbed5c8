"""`pdserve generate` end to end as a user runs it, and one-line errors for bad flags."""

from __future__ import annotations

import json
import subprocess
import sys


def pdserve(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pdserve.services.cli", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def test_generate_writes_jsonl(tmp_path, tiny_models):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nThe weather today is\n\nA third prompt\n")
    out = tmp_path / "results.jsonl"
    proc = pdserve("generate", "--model", tiny_models["llama"], "--input", str(prompts), "--output", str(out),
                   "--max-tokens", "7", "--temperature", "0.8", "--seed", "3", "--n", "2", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and [r["index"] for r in rows] == [0, 1] * 3
    assert {r["prompt"] for r in rows} == {"Hello there", "The weather today is", "A third prompt"}
    for r in rows:
        assert r["tokens"] == 7 and r["finish_reason"] == "length" and isinstance(r["generated"], str)
        assert r["prompt_tokens"] > 0
    assert "Processed prompts" in proc.stderr  # tqdm progress bar
    again = tmp_path / "again.jsonl"
    pdserve("generate", "--model", tiny_models["llama"], "--input", str(prompts), "--output", str(again),
            "--max-tokens", "7", "--temperature", "0.8", "--seed", "3", "--n", "2", "--ignore-eos")
    assert again.read_text() == out.read_text()  # seeded: reproducible


def test_stop_flag(tmp_path, tiny_models):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n")
    base = json.loads(pdserve("generate", "--model", tiny_models["llama"], "--input", str(prompts),
                              "--max-tokens", "20", "--temperature", "0").stdout)
    stop = base["generated"][4:7]
    cut = json.loads(pdserve("generate", "--model", tiny_models["llama"], "--input", str(prompts), "--max-tokens",
                             "20", "--temperature", "0", "--stop", stop).stdout)
    assert cut["generated"] == base["generated"][:base["generated"].index(stop)]
    assert cut["finish_reason"] == "stop"


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_models):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n")
    cases = [(["--model", str(tmp_path / "nope")], "model path not found"),
             (["--model", tiny_models["llama"], "--top-p", "1.5"], "top_p"),
             (["--model", tiny_models["llama"], "--max-tokens", "0"], "max_tokens"),
             (["--model", tiny_models["llama"], "--temperature", "-1"], "temperature")]
    for extra, needle in cases:
        proc = pdserve("generate", "--input", str(prompts), *extra)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
    proc = pdserve("generate", "--input", str(tmp_path / "missing.txt"), "--model", tiny_models["llama"])
    assert proc.returncode == 2 and "missing.txt" in proc.stderr


def test_bench_latency_reports_consistent_numbers(tmp_path, tiny_models):
    out = tmp_path / "lat.json"
    proc = pdserve("bench", "latency", "--model", tiny_models["llama"], "--input-len", "12", "--output-len", "6",
                   "--batch-size", "3", "--num-iters-warmup", "1", "--num-iters", "3", "--json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["iterations"] == 3 and report["batch_size"] == 3 and report["output_len"] == 6
    assert 0 < report["p50_latency_s"] <= report["p90_latency_s"] <= report["p99_latency_s"]
    # first token + 5 more tokens at the per-token time can't take longer than the whole batch
    assert 0 < report["avg_ttft_ms"] / 1000 < report["avg_latency_s"]
    assert report["avg_ttft_ms"] / 1000 + 5 * report["avg_ms_per_output_token"] / 1000 <= report["avg_latency_s"] * 1.01
    assert "ms per output token" in proc.stdout
    bad = pdserve("bench", "latency", "--model", tiny_models["llama"], "--output-len", "0")
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1] == \
        "pdserve bench latency: --output-len must be at least 1"


def test_generate_with_speculative_decoding(tmp_path, tiny_models):
    """--speculative-config (n-gram) and the --speculative-model shorthand give the greedy tokens
    of a run without them; a bad config is one line."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there, hello there, hello\nThe weather today is\n")
    base = ["generate", "--model", tiny_models["llama"], "--input", str(prompts), "--max-tokens", "12",
            "--temperature", "0"]
    want = pdserve(*base).stdout
    ngram = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2})
    for extra in (["--speculative-config", ngram],
                  ["--speculative-model", tiny_models["llama"], "--num-speculative-tokens", "2"]):
        proc = pdserve(*base, *extra)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == want
    bad = pdserve(*base, "--speculative-config", '{"method": "eagle", "num_speculative_tokens": 2}')
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "pdserve generate: error: --speculative-config: method must be one of ngram, draft_model, got 'eagle'"]


def test_bench_spec_reports_every_method(tmp_path, tiny_models):
    out = tmp_path / "spec.json"
    proc = pdserve("bench", "spec", "--model", tiny_models["llama"], "--batch-sizes", "1", "2", "--max-tokens", "6",
                   "--sequential-prompts", "1", "-k", "2", "--kv-cache-memory", "0.1", "--json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["batch_size"]) for r in rows] == [(m, b) for b in (1, 2) for m in ("none", "ngram", "draft")]
    assert all(r["outputs_identical"] and r["ms_per_output_token"] > 0 for r in rows)
    drafted = [r for r in rows if r["method"] == "draft"]
    assert all(r["acceptance_rate"] == 1.0 and r["mean_accepted_length"] > 1 and r["bound"] > 0 for r in drafted)
