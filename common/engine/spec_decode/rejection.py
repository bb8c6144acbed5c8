"""Verification: which drafts the target accepts, and the token after them.

For a request with n drafts fed, the target's logits at its last n + 1 positions give rows
0..n; row j is the target's distribution p_j for the token at position first_position + j.

    greedy (temperature 0)   X_j = argmax p_j; accept d_j while d_j == X_j; then X_j
    one-hot drafts (n-gram)  X_j = argmax(p_j / E_j), the sampler's exponential race; accept d_j
                             while d_j == X_j; then X_j. This *is* Leviathan et al.'s rule for
                             q = one-hot(d): P(accept) = p(d) = min(1, p(d)/q(d)), and a rejected
                             X_j follows p without d, i.e. norm(max(0, p - q)).
    draft probabilities q_j  Leviathan et al.: accept d_j when u_j * q_j(d_j) < p_j(d_j); on
    (draft model, T > 0)     reject, the residual argmax(max(0, p_j - q_j) / E_j); a row past
                             the drafts samples X_j from p_j.

Seeded draws follow the engine's rule (model_runner.position_seed): the noise E_j (|V|
exponentials, drawn first) and u_j (one uniform, drawn after) for the token at absolute position
pos come from a generator seeded with position_seed(seed, pos). E_j is exactly what the plain
sampler draws for that position, so with n-gram drafts a seeded request gives the same tokens
as without speculation. For draft models the draft tokens themselves are drawn from a separate
stream (`draft_position_seed`): Leviathan's proof needs d_j independent of u_j and E_j.
p and q are the *processed* distributions (temperature, top-k, top-p, min-p), so outputs follow
what the plain sampler would sample from.

`queue_verify` queues all of it on the device without waiting and returns one int64 readback
and the host function that finishes the acceptance from it (`verify` does both at once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pdserve.common.engine.sampler import processed_probs, row_argmax, to_device
from pdserve.common.sampling_params import SamplingParams


# From this many rows the acceptance runs as one numpy pass (batch 16, k = 8: 43 us against 73 us
# of Python per row); below, Python per row is quicker (batch 1: ~1-3 us against numpy's ~15 us).
NUMPY_ROWS = 32


@dataclass
class DraftRows:
    """One speculating request's rows in a verify step."""
    first_row: int  # its first row in the step's logits
    num_rows: int  # drafts fed + 1
    draft_token_ids: list[int]  # the fed drafts, plus one for the last row when a draft model gave it
    draft_probs: torch.Tensor | None  # [len(draft_token_ids), V] draft distributions; None: one-hot / greedy
    params: SamplingParams
    first_position: int  # absolute position of the token its row 0 decides


def verify(logits: torch.Tensor, reqs: list[DraftRows], shared: torch.Generator,
           position_seed) -> list[list[int]]:
    """logits [R, V] -> per request, its accepted drafts followed by one more token.
    `shared` draws for unseeded requests; `position_seed(seed, pos)` seeds the others.
    (queue_verify and its finish in one call: waits for the device.)"""
    readback, finish = queue_verify(logits, reqs, shared, position_seed)
    return finish(readback.tolist())


def queue_verify(logits: torch.Tensor | None, reqs: list[DraftRows], shared: torch.Generator, position_seed,
                 best: torch.Tensor | None = None):
    """The device part of `verify`, queued without waiting for the device: -> (readback, finish).
    `best`: every row's argmax token [R] where the caller has it (a greedy step's tail graph:
    `logits` is then None and every request is greedy).
    readback: int64 [R + 2 L] on the device (L: rows decided by Leviathan's rule),

        | token per row [R] | accepted? per Leviathan row [L] | residual token per Leviathan row [L] |

    finish(readback as a host list) -> per request, its accepted drafts and the token after them
    (Python over the request's few rows)."""
    if best is None:
        best = row_argmax(logits)  # [R]; rows of random requests get their samples instead
    device = best.device
    random = [(r, j) for r in reqs if r.params.temperature != 0 for j in range(r.num_rows)]
    lev = []  # rows (in `random`) with a draft distribution: Leviathan's rule
    parts = [best]
    if random:
        index = to_device([r.first_row + j for r, j in random], torch.int64, device)
        probs = processed_probs(logits.index_select(0, index), [r for r, _ in random])  # [Rr, V]
        probs = probs / probs.sum(dim=-1, keepdim=True)  # top-k/p/min-p leave mass < 1: p/q needs it whole
        noise = torch.empty_like(probs)
        u = torch.zeros(len(random), device=device)
        gen = torch.Generator(device=device)
        for k, (r, j) in enumerate(random):
            g = shared if r.params.seed is None else gen.manual_seed(position_seed(r.params.seed, r.first_position + j))
            noise[k].exponential_(generator=g)  # first: the plain sampler's draw for this position
            if r.draft_probs is not None and j < len(r.draft_token_ids):
                u[k:k + 1].copy_(torch.rand(1, generator=g, device=device))
                lev.append(k)
        samples = (probs / noise).argmax(dim=-1)
        best.index_copy_(0, index, samples)
        if lev:
            li = to_device(lev, torch.int64, device)
            p = probs.index_select(0, li)  # [L, V]
            q = torch.stack([random[k][0].draft_probs[random[k][1]] for k in lev])  # [L, V]
            d = to_device([random[k][0].draft_token_ids[random[k][1]] for k in lev], torch.int64, device)[:, None]
            accept = u.index_select(0, li) * q.gather(1, d)[:, 0] < p.gather(1, d)[:, 0]
            rest = (p - q).clamp_(min=0)  # norm(max(0, p - q)); all zero only when p <= q everywhere
            residual = torch.where(rest.sum(dim=-1) > 0, (rest / noise.index_select(0, li)).argmax(dim=-1),
                                   samples.index_select(0, li))
            parts += [accept.long(), residual]
    readback = torch.cat(parts) if len(parts) > 1 else best
    num_rows = best.shape[0]
    if not lev and num_rows >= NUMPY_ROWS:  # every row decided by "draft == its token": one numpy pass
        return readback, _match_finish(reqs, num_rows)

    def finish(values: list[int]) -> list[list[int]]:
        decided = {}  # Leviathan rows: (id(req), row) -> (accepted, token)
        for i, k in enumerate(lev):
            r, j = random[k]
            decided[(id(r), j)] = (bool(values[num_rows + i]), values[num_rows + len(lev) + i])
        outs = []
        for r in reqs:
            out = []
            for j in range(r.num_rows):
                x = values[r.first_row + j]
                if j >= len(r.draft_token_ids):  # no draft for this row: the target's own token
                    out.append(x)
                    break
                d = r.draft_token_ids[j]
                ok, token = decided.get((id(r), j), (x == d, x))
                out.append(d if ok else token)
                if not ok:
                    break
            outs.append(out)
        return outs
    return readback, finish


def _match_finish(reqs: list[DraftRows], num_rows: int):
    """finish() of a step whose drafts are all accepted by equality (greedy rows, one-hot drafts):
    a request accepts its drafts up to the first row whose token differs, then that row's token.

        check [R]  the draft each row's token is compared with; -1 (never equal) on a request's
                   last row (past its fed drafts) and on rows of requests sampled plainly
        bad        rows whose token differs from their check: a request's first bad row at or
                   after its first row is where it stops (its last row always is one)"""
    starts = np.fromiter((r.first_row for r in reqs), np.int64, len(reqs))

    def finish(values: list[int]) -> list[list[int]]:
        check = np.full(num_rows, -1, np.int64)  # (here: drafts left on the device are known only now)
        for r in reqs:
            n = min(len(r.draft_token_ids), r.num_rows - 1)
            check[r.first_row:r.first_row + n] = r.draft_token_ids[:n]
        tokens = np.asarray(values[:num_rows], np.int64)
        bad = np.flatnonzero(tokens != check)
        stop = bad[np.searchsorted(bad, starts)]  # [N] each request's first bad row
        accepted, last = (stop - starts).tolist(), tokens[stop].tolist()
        return [r.draft_token_ids[:a] + [t] for r, a, t in zip(reqs, accepted, last)]
    return finish
