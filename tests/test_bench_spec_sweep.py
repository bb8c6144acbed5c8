"""`pdserve bench spec --sweep` (services/bench_spec_sweep.py): the replay of the overlapped
engine's steps on a hand-checked history, and the command end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from pdserve.services.bench_spec_sweep import replay
from tests.test_cli import pdserve


def test_replay_counts_steps_as_the_overlapped_engine_ran_them_before_the_guess():
    prompt, output = [7, 1, 2, 3, 4], [1, 2, 3, 9, 5, 6]
    r = replay([(prompt, output)], min_n=1, max_n=2, k=3, max_tokens=100, plain_ms=1.0, verify_ms=2.0, guess=False)
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


def test_replay_verifies_drafts_past_a_guessed_token_in_flight():
    prompt, output = [7, 1, 2, 3, 4], [1, 2, 3, 9, 5, 6]
    r = replay([(prompt, output)], min_n=1, max_n=2, k=3, max_tokens=100, plain_ms=1.0, verify_ms=2.0,
               guess_verify_ms=1.5)
    # step 1 (the prefill's token 1 in flight): "4" never occurred -> plain (1 -> 2 in flight)
    # step 2 (2 in flight): on 7 1 2 3 4 1, "1" occurred at 1 -> 2 3 4 1: guess 2 (right),
    #   drafts 3 4 1 against 3 9 5: 1 accepted + 9 (a verify step launched while step 1 ran)
    # step 3 waits for it: "9" never occurred -> plain (5); step 4 (5 in flight): the same lookup -> plain (6)
    assert (r.steps, r.verify_steps, r.guess_steps, r.guess_hits, r.lookups, r.draft_tokens, r.accepted) == \
        (4, 1, 1, 1, 4, 3, 1)
    assert r.row()["ms_per_token"] == pytest.approx((1.0 + 1.5 + 1.0 + 1.0) / 5)
    # right after the prompt: 5 6 7 8 5 -> guess 6 for the prefill's token; with drop=False (the
    # engine before) a wrong guess (4) still lets the drafts 7 8 be accepted (the target verifies
    # them behind the real token)
    for first, hits in ((6, 1), (4, 0)):
        out = [first, 7, 8, 9, 1]
        r = replay([([5, 6, 7, 8, 5], out)], 1, 2, 3, max_tokens=100, plain_ms=1.0, verify_ms=2.0, guess_verify_ms=1.5,
                   drop=first == 6)
        assert (r.steps, r.verify_steps, r.guess_steps, r.guess_hits, r.accepted, r.dropped) == (2, 1, 1, hits, 2, 0)
        before = replay([([5, 6, 7, 8, 5], out)], 1, 2, 3, max_tokens=100, plain_ms=1.0, verify_ms=2.0, guess=False)
        # before: step 1 plain without a lookup; step 2 on 5 6 7 8 5 first 7 drafts 8 5 .. (1 accepted + 9); 3 plain
        assert (before.steps, before.verify_steps, before.accepted) == (3, 1, 1)
    # the engine drops the drafts past the wrong guess 4 (one token, 7; the next launches first):
    # step 2 (8 in flight) on 5 6 7 8 5 4, "4" never occurred -> plain; step 3 (9 in flight) on
    # .. 4 7: "7" at 2 -> guess 8 (right), drafts 5 4 7 against 9 1: none accepted (+ 9);
    # step 4 waits for it: "9" never occurred -> plain (1)
    r = replay([([5, 6, 7, 8, 5], [4, 7, 8, 9, 1])], 1, 2, 3, max_tokens=100, plain_ms=1.0, verify_ms=2.0,
               guess_verify_ms=1.5)
    assert (r.steps, r.verify_steps, r.guess_steps, r.guess_hits, r.dropped, r.draft_tokens, r.accepted) == \
        (4, 2, 2, 1, 1, 3, 0)
    assert r.row()["ms_per_token"] == pytest.approx((1.5 + 1.0 + 1.5 + 1.0) / 4)


def test_bench_spec_sweep_command(tmp_path, tiny_models):
    out = tmp_path / "sweep.json"
    proc = pdserve("bench", "spec", "--sweep", "--model", tiny_models["llama"], "--max-tokens", "8",
                   "--sequential-prompts", "2", "--sweep-min", "1", "2", "--sweep-max", "2", "--sweep-k", "2", "4",
                   "--kv-cache-memory", "0.1", "--dtype", "float32", "--json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert sorted((r["prompt_lookup_min"], r["prompt_lookup_max"], r["k"]) for r in rows) == [
        (1, 2, 2), (1, 2, 4), (2, 2, 2), (2, 2, 4)]
    assert all(r["ms_per_token"] > 0 and r["speedup"] > 0 and r["speedup_no_guess"] > 0 and r["speedup_no_drop"] > 0
               and r["tokens_per_step"] >= 1
               for r in rows)
    assert "2 prompts" in proc.stdout and "speedup" in proc.stdout


def test_bench_spec_stages_command(tmp_path, tiny_models):
    """`bench spec --stages` (services/bench_spec_stages.py): per engine (none, n-gram one step at
    a time, n-gram overlapped) and kind of decode step, its host ms by stage."""
    out = tmp_path / "stages.json"
    proc = pdserve("bench", "spec", "--stages", "--model", tiny_models["llama"], "--max-tokens", "12",
                   "--sequential-prompts", "2", "--batch-sizes", "1", "3", "--kv-cache-memory", "0.1",
                   "--dtype", "float32", "--json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    by_method = json.loads(out.read_text())
    assert set(by_method) == {"none", "ngram", "ngram_overlap"}  # a plain engine, n-gram one at a time, overlapped
    for method, tables in by_method.items():
        assert set(tables) == {"1", "3"}
        for table in tables.values():
            assert table["plain"]["steps"] > 0 and set(table) <= {"plain", "verify", "guess", "bridge"}
            assert method != "none" or set(table) == {"plain"}
            for row in table.values():
                assert row["step"] > row["forward"] > 0 and row["schedule"] > 0 and row["flatten"] > 0
                assert row["host"] == pytest.approx(row["step"] - row["wait"] - row["forward"], abs=1e-3)
    assert "host ms per decode step by stage" in proc.stdout


def test_bench_spec_stages_of_a_draft_model(tmp_path, tiny_models):
    """`--stages --methods none draft draft_sync`: the draft engines' verify steps with their forward
    passes and token picks timed (inside propose; on CUDA, for `draft`, also the round drafted
    ahead behind a verify step); a method --stages cannot time is a one-line error."""
    out = tmp_path / "stages.json"
    proc = pdserve("bench", "spec", "--stages", "--methods", "none", "draft", "draft_sync", "--model", tiny_models["llama"],
                   "--max-tokens", "12", "--sequential-prompts", "2", "--batch-sizes", "1", "-k", "3",
                   "--kv-cache-memory", "0.1", "--dtype", "float32", "--json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    by_method = json.loads(out.read_text())
    assert set(by_method) == {"none", "draft", "draft_sync"}
    verify = by_method["draft"]["1"]["verify"]
    assert verify["steps"] > 0 and verify["propose"] > 0 and verify["dforward"] > 0
    verify = by_method["draft_sync"]["1"]["verify"]  # (no ahead round: every forward pass inside propose)
    assert verify["steps"] > 0 and verify["propose"] >= verify["dforward"] + verify["dsample"] > 0
    assert "draft model" in proc.stdout
    bad = pdserve("bench", "spec", "--stages", "--methods", "none", "ngram_all", "--model", tiny_models["llama"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "pdserve bench: error: --stages times none, ngram, ngram_overlap, ngram_guess, draft, draft_sync; not ngram_all"]


def test_replay_bridges_a_verify_step():
    """bridge=True (the engine's bridge steps, pipeline.py): after the verify step (a guessed one
    here, all 3 drafts accepted) a bridge step launched before its result makes one token more;
    without it the next step looks up on the full history and finds nothing (a plain step)."""
    sample = [([5, 6, 7, 8, 5], [6, 7, 8, 5, 1, 2])]
    r = replay(sample, 1, 2, 3, max_tokens=100, plain_ms=1.0, verify_ms=2.0, guess_verify_ms=1.5, bridge=True,
               bridge_ms=1.25)
    assert (r.steps, r.verify_steps, r.guess_steps, r.guess_hits, r.bridge_steps, r.bridge_void, r.accepted) == \
        (2, 1, 1, 1, 1, 0, 3)
    assert r.ms_per_token == [pytest.approx((1.5 + 1.25) / 5)]
    before = replay(sample, 1, 2, 3, max_tokens=100, plain_ms=1.0, verify_ms=2.0, guess_verify_ms=1.5)
    assert (before.steps, before.bridge_steps) == (2, 0) and before.ms_per_token == [pytest.approx((1.5 + 1.0) / 5)]
    # the output ends with the verify step: the bridge still runs (launched before the result), its token unused
    ends = replay([(sample[0][0], sample[0][1][:5])], 1, 2, 3, max_tokens=100, plain_ms=1.0, verify_ms=2.0,
                  bridge=True, bridge_ms=1.25)
    assert (ends.steps, ends.bridge_steps, ends.bridge_void, ends.tokens) == (2, 1, 0, 4)


def test_bench_graphs_needs_cuda_graphs(tiny_models):
    """`bench graphs` (services/bench_graphs.py) times CUDA-graph replays: elsewhere one line says so."""
    proc = pdserve("bench", "graphs", "--model", tiny_models["llama"], "--kv-cache-memory", "0.1", "--dtype", "float32")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == \
        "bench graphs: the engine has no CUDA graphs (CUDA only, without --enforce-eager)"
