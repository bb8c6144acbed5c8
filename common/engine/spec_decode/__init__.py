"""Speculative decoding: propose k tokens cheaply, verify them in one target forward pass.

    scheduler.schedule()   a decoding request gets num_spec_slots = min(k, budget, room) KV slots
                           past its known tokens (`max_draft_tokens`, this module: torch-free)
    runner.launch()        SpecDecoder.prepare: the proposer (ngram.py on the host, or
                           draft_model.py, a second ModelRunner) fills up to num_spec_slots drafts,
                           appended to the request's input tokens: [last token, d1 .. dn]
                           -> one target forward; logits at all n + 1 positions
                           -> rejection.py accepts a prefix of the drafts, then one more token
    scheduler.update()     appends accepted drafts + that token, num_computed_tokens += accepted
                           (rejected drafts' KV is simply never counted), frees blocks that hold
                           only rejected positions (KVCacheManager.free_tail)

The runner owns the proposers (like vLLM's workers), so SchedulerOutput stays ids and ints.

Which requests speculate: those that have produced their first token (the first token is
always sampled plainly, as a prefill worker without speculation samples it) and that need no
per-token host data (penalties, min_tokens, logprobs: `SamplingParams.needs_host_history`) and
no token mask (structured outputs, allowed_token_ids, bad_words: their next mask depends on
each accepted token; such a request is sampled plainly under its mask, in the same batch).
The proposals need the tokens of the step before: after a verify step the next step waits for
its result. After a step without drafts (async scheduling, n-gram) the next one launches while
it runs, its input token in flight: the lookup then runs on the history without that token,
drafting one further, its first token a guess of the one in flight (pipeline.py).
"""

from __future__ import annotations

from pdserve.common.request import Request
from pdserve.common.sampling_params import SamplingParams


def speculates(params: SamplingParams, num_output_tokens: int) -> bool:
    """Whether a request's next tokens are drafted and verified (when it has room for drafts);
    `num_output_tokens` counts a token in flight."""
    return num_output_tokens > 0 and not params.needs_host_history and not params.has_token_mask


def max_draft_tokens(req: Request, k: int, max_model_len: int) -> int:
    """Drafts this request may have verified in its next step (before the token budget): 0 when it
    does not speculate; never so many that accepting all of them plus the token after would pass
    max_tokens or max_model_len. With a token in flight (num_inflight = 1: the step before runs,
    the proposer guesses that token) they start one position further."""
    p = req.params
    if not k or req.num_inflight > 1 or not speculates(p, req.num_output_tokens + req.num_inflight):
        return 0
    room = max_model_len - req.num_tokens - req.num_inflight - 1
    if p.max_tokens is not None:
        room = min(room, p.max_tokens - req.num_output_tokens - req.num_inflight - 1)
    return max(0, min(k, room))


VERIFY_GRAPH_REQUESTS = 3  # verify_graph_sizes: graphs for verify steps of up to this many drafting requests


def verify_graph_sizes(k: int, num_requests: int = VERIFY_GRAPH_REQUESTS) -> list[int]:
    """Decode-graph batch sizes, beside the power-of-two buckets, that a speculative engine's
    verify and bridge steps fill exactly: 1 .. num_requests requests of k + 1 one-token rows each
    (steps run as rows: decoder.as_rows). One H200, SmolLM2 bf16: a 9-row step (k = 8) padded to
    the 16-row graph cost 1.32-1.41 ms against ~1.04-1.11 for 8 rows and 0.69 for 1."""
    return [b * (k + 1) for b in range(1, num_requests + 1)]
