"""kernels/ngram_round.py against the torch round of spec_decode/device_rounds.py (lookup, the
rows' inputs, the acceptance): on CUDA (marked gpu) and on the CPU under the Triton interpreter
(a subprocess with TRITON_INTERPRET=1), random histories of small vocabularies (many matches),
history capacities of one and two scoring blocks."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def check(device: str, trials: int) -> int:
    """Every case's kernel outputs equal the torch round's; -> how many cases found drafts."""
    from pdserve.common.engine.spec_decode.device_rounds import lookup
    from pdserve.kernels.ngram_round import BLOCK, round_accept, round_inputs
    rng = random.Random(7)
    dev = torch.device(device)
    found_any = 0
    for trial in range(trials):
        vocab = (2, 5, 50)[trial % 3]
        cap = BLOCK * (1 + trial % 2)
        k = rng.randrange(1, 16)
        min_n = rng.randrange(1, 4)
        max_n = rng.randrange(min_n, 6)
        length = rng.randrange(1, min(cap - k - 2, 300 if trial % 2 == 0 else cap - k - 2))
        hist = torch.randint(0, vocab, (cap,), generator=torch.Generator().manual_seed(trial)).to(dev)
        block_size = rng.choice((4, 16))
        table = torch.randperm(cap // block_size + 2, generator=torch.Generator().manual_seed(trial)).to(dev)
        length_t = torch.tensor(length, device=dev)
        drafts, count = torch.zeros(k, dtype=torch.int64, device=dev), torch.zeros((), dtype=torch.int64, device=dev)
        ids, pos, slots, ctx = (torch.zeros(k + 1, dtype=torch.int32, device=dev) for _ in range(4))
        round_inputs(hist, length_t, table, drafts, count, ids, pos, slots, ctx, block_size, min_n, max_n, k)
        want_drafts, want_count = lookup(hist, length_t, min_n, max_n, k)
        n = int(want_count)
        assert int(count) == n, (trial, int(count), n)
        assert drafts[:n].tolist() == want_drafts[:n].tolist()
        rows = torch.arange(k + 1, device=dev)
        want_pos = length - 1 + rows
        assert ids.tolist() == torch.cat([hist[length - 1:length], want_drafts]).tolist()
        assert pos.tolist() == want_pos.tolist() and ctx.tolist() == (want_pos + 1).tolist()
        assert slots.tolist() == (table[want_pos // block_size] * block_size + want_pos % block_size).tolist()
        found_any += n > 0
        # the target agrees with the first a drafts (a random), then differs
        a = rng.randrange(0, n + 1)
        x = torch.randint(0, vocab, (k + 1,), generator=torch.Generator().manual_seed(100 + trial)).to(dev)
        x[:a] = drafts[:a]
        if a < n:
            x[a] = (drafts[a] + 1) % vocab
        want_accepted = a
        hist_before = hist.clone()
        rounds = 3
        xs, took, found = (torch.zeros(shape, dtype=torch.int64, device=dev) for shape in ((rounds, k + 1), rounds, rounds))
        rnd = torch.tensor(1, device=dev)
        round_accept(hist, length_t, rnd, drafts, count, x, xs, took, found, k)
        assert int(took[1]) == want_accepted + 1 and int(found[1]) == n and xs[1].tolist() == x.tolist()
        assert int(length_t) == length + want_accepted + 1 and int(rnd) == 2
        assert hist[length:length + k + 1].tolist() == x.tolist()
        assert torch.equal(hist[:length], hist_before[:length])
    return found_any


@pytest.mark.gpu
def test_round_kernels_on_cuda():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs CUDA (without TRITON_INTERPRET)")
    assert 0 < check("cuda", 300) < 300


def test_round_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    code = ("import sys; from tests.kernels.test_ngram_round import check; n = check('cpu', 24); "
            "assert 0 < n < 24, n; print('OK', n)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
