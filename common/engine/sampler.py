"""Sampler: logits [B, V] -> one token per row, plus logprobs when asked (pure torch).

Order per row: token bitmask (grammar, allowed_token_ids, bad_words: masked logits -> -inf) ->
logit_bias -> penalties -> min_tokens (EOS/stop ids masked) -> greedy argmax, or temperature ->
softmax -> top-k / top-p / min-p -> exponential race `argmax(p / q)`, q ~ Exp(1) drawn from the
request's own torch.Generator when it has a seed (so a seeded request gives the same tokens
whatever else is in the batch). Reported logprobs are the model's raw distribution
(log_softmax of the logits before any processing), as vLLM reports them by default.
"""

from __future__ import annotations

import functools

import torch

from pdserve.common.engine.outputs import ScheduledRequest

TopLogprobs = dict[int, tuple[float, int]]  # token id -> (logprob, 1-based rank)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self._shared = torch.Generator(device=device)
        self._shared.manual_seed(seed)

    @property
    def shared_generator(self) -> torch.Generator:
        """The stream of unseeded requests (speculative verification draws from it too)."""
        return self._shared

    def sample(self, logits: torch.Tensor, reqs: list[ScheduledRequest], eos_token_ids: tuple[int, ...],
               generators: list[torch.Generator | None], bitmask: torch.Tensor | None = None,
               history: bool = True) -> torch.Tensor:
        """Tokens [B] on the device; nothing here waits for the device (small host lists go
        through pinned memory), so a step can be queued behind the one running. `bitmask`
        [B, ceil(V / 32)] int32 on the host: bit t of row i set = token t allowed for row i.
        history=False: no row has penalties, min_tokens or logprobs (the scheduler knows; the
        rows are not scanned for them)."""
        if bitmask is not None:  # in place unless logprobs (of the raw logits) are wanted
            logits = apply_token_bitmask(logits, bitmask,
                                         copy=history and any(r.params.logprobs is not None for r in reqs))
        logits = self._apply_logit_bias(logits, reqs)
        if history:
            logits = self._apply_penalties(logits, reqs)
            logits = self._apply_min_tokens(logits, reqs, eos_token_ids)
        greedy = [r.params.temperature == 0 for r in reqs]
        tokens = row_argmax(logits)
        if not all(greedy):
            tokens = torch.where(to_device(greedy, torch.bool, logits.device), tokens,
                                 self._sample_random(logits, reqs, generators))
        return tokens

    @staticmethod
    def logprobs(raw: torch.Tensor, tokens: torch.Tensor,
                 reqs: list[ScheduledRequest]) -> dict[str, tuple[float, TopLogprobs]]:
        """The raw distribution's logprobs of the chosen tokens, for requests that ask (waits)."""
        logprobs = {}
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if want:
            lp = torch.log_softmax(raw[want], dim=-1)
            chosen = tokens[want]
            for row, i in enumerate(want):
                logprobs[reqs[i].req_id] = top_logprobs(lp[row], chosen[row].item(), reqs[i].params.logprobs)
        return logprobs

    def _sample_random(self, logits, reqs, generators) -> torch.Tensor:
        probs = processed_probs(logits, reqs)
        q = torch.empty_like(probs)
        for i, gen in enumerate(generators):
            q[i].exponential_(generator=gen if gen is not None else self._shared)
        return row_argmax(probs / q)

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, reqs: list[ScheduledRequest]) -> torch.Tensor:
        rows = [(i, r.params.logit_bias) for i, r in enumerate(reqs) if r.params.logit_bias]
        if not rows:
            return logits
        row_ids = [i for i, bias in rows for _ in bias]
        token_ids = [t for _, bias in rows for t in bias]
        values = [v for _, bias in rows for v in bias.values()]
        logits = logits.clone()
        logits.index_put_((to_device(row_ids, torch.long, logits.device), to_device(token_ids, torch.long, logits.device)),
                          to_device(values, logits.dtype, logits.device), accumulate=True)
        return logits

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, reqs: list[ScheduledRequest]) -> torch.Tensor:
        rows = [i for i, r in enumerate(reqs) if r.params.has_penalties]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            p = reqs[i].params
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(reqs[i].prompt_token_ids) | set(reqs[i].output_token_ids)),
                                    dtype=torch.long, device=logits.device)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and reqs[i].output_token_ids:
                out = torch.tensor(reqs[i].output_token_ids, dtype=torch.long, device=logits.device)
                counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    @staticmethod
    def _apply_min_tokens(logits, reqs, eos_token_ids) -> torch.Tensor:
        """EOS and the stop ids banned before min_tokens, unless the row's mask left nothing else:
        a complete grammar allows only EOS, and min_tokens does not hold it open (banned, every
        logit was -inf: a token the grammar rejects was sampled and the request failed). Decided
        on the device (torch.where), so nothing waits for it."""
        rows = [i for i, r in enumerate(reqs) if len(r.output_token_ids) < r.params.min_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            banned = list(reqs[i].params.stop_token_ids) + ([] if reqs[i].params.ignore_eos else list(eos_token_ids))
            if not banned:
                continue
            row = logits[i]  # [V], a view
            kept = row.clone() if reqs[i].params.has_token_mask else None  # only a mask can leave it empty
            row[banned] = float("-inf")
            if kept is not None:
                logits[i] = torch.where(torch.isfinite(row).any(), row, kept)
        return logits


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """Logits with the tokens whose bit is clear set to -inf (`copy`: on a copy, so the raw
    logits stay for logprobs). xgrammar's kernel: C++ on CPU, Triton on CUDA."""
    from xgrammar import apply_token_bitmask_inplace
    if copy:
        logits = logits.clone()
    apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), vocab_size=logits.shape[1])
    return logits
def processed_probs(logits: torch.Tensor, reqs) -> torch.Tensor:
    """The distribution a random row samples from: softmax(logits / temperature), then top-k /
    top-p / min-p (row i follows reqs[i].params), not renormalized after the filters (the
    exponential race does not need it). Speculative verification shares it."""
    temps = to_device([r.params.temperature or 1.0 for r in reqs], torch.float32, logits.device)
    return _filter(torch.softmax(logits / temps[:, None], dim=-1), reqs)


def _filter(probs: torch.Tensor, reqs: list[ScheduledRequest]) -> torch.Tensor:
    """Zero out tokens outside top-k / top-p / min-p, per row (kept set never empty)."""
    top_k = [r.params.top_k for r in reqs]
    top_p = [r.params.top_p for r in reqs]
    min_p = [r.params.min_p for r in reqs]
    if all(k == -1 for k in top_k) and all(p == 1.0 for p in top_p) and all(m == 0 for m in min_p):
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    vocab = probs.shape[1]
    ks = to_device([k if k > 0 else vocab for k in top_k], torch.int64, probs.device)
    ranks = torch.arange(vocab, device=probs.device)[None, :]
    drop = ranks >= ks[:, None]
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of strictly better tokens
    drop |= mass_before >= to_device(top_p, torch.float32, probs.device)[:, None]
    drop |= sorted_p < to_device(min_p, torch.float32, probs.device)[:, None] * sorted_p[:, :1]
    drop[:, 0] = False
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] -> [N] int64, each row's first maximal column, as torch.argmax. On the CPU by
    `max(dim)`, which finds the same column ~3x faster there (64 x 49,152 bf16 logits: 2.2 ms
    against 7.4 for aten's argmax, 2 cores); on CUDA inside a graph being captured (the greedy
    tail's) by kernels/argmax.py's two short kernels (aten's reduces a row in one thread block:
    19 against 11 us a call for one row of SmolLM2's 49,152 logits, one H200, launch included),
    eagerly by aten's, whose one launch costs the host less than Triton's two (a draft model's
    eager rounds spent ~0.16 ms each picking their tokens with them)."""
    if x.device.type == "cpu":
        return x.max(dim=-1).indices
    if x.device.type == "cuda" and x.dim() == 2 and x.stride(-1) == 1 and torch.cuda.is_current_stream_capturing() \
            and _triton():
        from pdserve.kernels.argmax import row_argmax as kernel
        return kernel(x)
    return x.argmax(dim=-1)


@functools.cache
def _triton() -> bool:
    from pdserve.kernels import triton_available
    return triton_available()


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the stream (a plain copy from pageable
    memory would synchronize it, and with it the step queued ahead)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def top_logprobs(lp: torch.Tensor, chosen: int, k: int) -> tuple[float, TopLogprobs]:
    """Chosen token's logprob and {token: (logprob, rank)} for it and the k most likely tokens."""
    chosen_lp = lp[chosen].item()
    rank = int((lp > chosen_lp).sum().item()) + 1
    entries = {chosen: (chosen_lp, rank)}
    if k:
        vals, ids = lp.topk(k)
        for r, (v, t) in enumerate(zip(vals.tolist(), ids.tolist()), start=1):
            entries.setdefault(t, (v, r))
    return chosen_lp, entries
