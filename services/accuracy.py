"""`pdserve bench accuracy`: what quantization costs, measured through the engine's public API.

    scoring     prompt_logprobs=1 on windows of a fixed text: the log-probability of every next
                token (-> perplexity) and the top-1 token at each position (-> teacher-forced
                agreement with the reference model, position by position)
    generation  greedy answers of the quantized and the reference model to the same prompts:
                token agreement (positions equal, up to the first difference counted as such) and
                exact-match rate of whole answers

    pdserve bench accuracy [--model M.gguf|HF] [--text FILE] [--prompts FILE] [--variants ...]

Variants: fp32 (the reference: the packaged GGUF dequantized to an HF folder in fp32), bf16, fp8
(online), fp8-kv (--kv-cache-dtype fp8), awq / gptq / gptq-act (written by `pdserve quantize`,
RTN), gguf (the GGUF file run through its quantized kernels). Prints a table and one JSON line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Scores:
    logprobs: list[float]  # log p(token_i | tokens_<i) for every scored token
    top1: list[int]  # argmax token at each scored position

    def perplexity(self) -> float:
        return math.exp(-sum(self.logprobs) / len(self.logprobs))


def score_tokens(llm, token_ids: list[int], window: int) -> Scores:
    """Scores of token_ids in consecutive windows of `window` tokens (each window restarts the
    context; the first token of a window is not scored). Prefix caching must be off (cached
    positions carry no prompt logprobs)."""
    from pdserve.common.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    chunks = [token_ids[i:i + window] for i in range(0, len(token_ids), window)]
    chunks = [c for c in chunks if len(c) > 1]
    outs = llm.generate([{"prompt_token_ids": c} for c in chunks], params, use_tqdm=False)
    logprobs, top1 = [], []
    for chunk, out in zip(chunks, outs):
        entries = out.prompt_logprobs
        assert entries is not None and len(entries) == len(chunk), "prompt logprobs missing: prefix caching on?"
        for token, entry in zip(chunk[1:], entries[1:]):
            logprobs.append(entry[token].logprob)
            top1.append(next(t for t, lp in entry.items() if lp.rank == 1))
    return Scores(logprobs, top1)


def greedy(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from pdserve.common.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False)]


def agreement(got: list[list[int]], want: list[list[int]]) -> dict:
    """token: share of reference positions with the same token (a sequence stops agreeing at its
    first difference: later tokens continue a different text); exact: share of identical answers;
    first: share of equal first tokens."""
    same = sum(next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
               for g, w in zip(got, want))
    total = sum(len(w) for w in want)
    return {"token": round(same / max(total, 1), 4),
            "exact": round(sum(g == w for g, w in zip(got, want)) / len(want), 4),
            "first": round(sum(bool(g and w and g[0] == w[0]) for g, w in zip(got, want)) / len(want), 4)}


def top1_agreement(a: Scores, b: Scores) -> float:
    return sum(x == y for x, y in zip(a.top1, b.top1)) / max(len(b.top1), 1)
