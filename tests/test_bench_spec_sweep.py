"""`pdserve bench spec --sweep` (services/bench_spec_sweep.py): the replay of the overlapped
engine's steps on a hand-checked history, and the command end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from pdserve.services.bench_spec_sweep import replay
from tests.test_cli import pdserve


def test_replay_counts_steps_as_the_overlapped_engine_runs_them():
    prompt, output = [7, 1, 2, 3, 4], [1, 2, 3, 9, 5, 6]
    r = replay([(prompt, output)], min_n=1, max_n=2, k=3, max_tokens=100, plain_ms=1.0, verify_ms=2.0)
    # step 1 launches while the prefill runs: plain, no lookup (2)
    # step 2: "1 2" occurred at 1-2 -> drafts 3 4 1, the output goes 3 9 5: 1 accepted + 9 (verify)
    # step 3: "3 9", "9" never occurred -> plain (5); step 4 launches before 5 is known: plain (6)
    assert (r.steps, r.verify_steps, r.lookups, r.draft_tokens, r.accepted, r.tokens) == (4, 1, 2, 3, 1, 5)
    row = r.row()
    assert row["mean_accepted_length"] == 2.0 and row["acceptance"] == pytest.approx(1 / 3)
    assert row["ms_per_token"] == pytest.approx((1.0 + 2.0 + 1.0 + 1.0) / 5)
    # max_tokens leaves no room for drafts past the last token: no lookup, plain steps only
    r = replay([(prompt, output[:2])], 1, 2, 3, max_tokens=2, plain_ms=1.0, verify_ms=2.0)
    assert (r.steps, r.lookups, r.verify_steps) == (1, 0, 0)


def test_bench_spec_sweep_command(tmp_path, tiny_models):
    out = tmp_path / "sweep.json"
    proc = pdserve("bench", "spec", "--sweep", "--model", tiny_models["llama"], "--max-tokens", "8",
                   "--sequential-prompts", "2", "--sweep-min", "1", "2", "--sweep-max", "2", "--sweep-k", "2", "4",
                   "--kv-cache-memory", "0.1", "--dtype", "float32", "--json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert sorted((r["prompt_lookup_min"], r["prompt_lookup_max"], r["k"]) for r in rows) == [
        (1, 2, 2), (1, 2, 4), (2, 2, 2), (2, 2, 4)]
    assert all(r["ms_per_token"] > 0 and r["speedup"] > 0 and r["tokens_per_step"] >= 1 for r in rows)
    assert "2 prompts" in proc.stdout and "speedup" in proc.stdout
