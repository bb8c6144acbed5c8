"""Request-level metrics of an engine that streams deltas itself: the prefill and decode workers.

`pdserve serve` and the router observe their requests where text is made (common/metrics.py
`RequestTracker`, one per RequestOutput stream). A worker has no such front end: its requests
arrive over gRPC and leave as `EngineOutput` deltas, so `AsyncLLM.stream` feeds each request's
deltas to a `DeltaTracker` when the worker set `AsyncLLM.request_metrics`. The names are vLLM's,
with this engine's view of the request, as each vLLM instance of a P/D pair reports its own:

    vllm:request_queue_time_seconds    arrival here -> first scheduled here
    vllm:time_to_first_token_seconds   arrival here -> this engine's first token (a decode
                                       worker's first token is the request's second: the
                                       prefill sampled the first; its TTFT includes the KV pull)
    vllm:inter_token_latency_seconds   between this engine's tokens of one sequence, one per token
                                       (a delta of several coalesced steps: its gap spread over them)
    vllm:e2e_request_latency_seconds   arrival here -> every sequence finished here
    vllm:prompt_tokens / generation_tokens, vllm:request_success{finished_reason}, request sizes
"""

from __future__ import annotations

import time

from pdserve.common.metrics import ServerMetrics, count_unfinished, itl_gaps, observe_many
from pdserve.common.outputs import EngineOutput


class MetricsBatch:
    """The token counts and inter-token latencies of many requests' deltas passed on together
    (one DecodeStream message), counted with one increment each at `flush()` instead of one
    locked prometheus call per token (services/decode/mux.py)."""

    def __init__(self, metrics: ServerMetrics, now: float | None = None):
        self.m = metrics
        self.now = time.time() if now is None else now
        self.num_tokens = 0
        self.itl: list[float] = []

    def add(self, num_new: int, since_last_s: float, first_of_sequence: bool) -> None:
        self.num_tokens += num_new
        gaps, gap_s = itl_gaps(num_new, since_last_s, first_of_sequence)
        if gaps == 1:
            self.itl.append(gap_s)
        elif gaps > 1:
            self.itl += [gap_s] * gaps

    def flush(self) -> None:
        if self.num_tokens:
            self.m.generation_tokens.inc(self.num_tokens)
        observe_many(self.m.itl, self.itl)
        self.num_tokens, self.itl = 0, []


class DeltaTracker:
    """One engine request (n sequences) seen through its deltas; O(1) work per delta."""

    def __init__(self, metrics: ServerMetrics, arrival_time: float, num_prompt_tokens: int, n: int,
                 finished_indices=()):
        self.m = metrics
        self.arrival_time = arrival_time
        self.num_tokens = [0] * n
        self.last_token_time = [arrival_time] * n
        self.finished = [i in finished_indices for i in range(n)]
        self.scheduled = self.first_token = self.done = False
        metrics.prompt_tokens.inc(num_prompt_tokens)
        metrics.request_prompt_tokens.observe(num_prompt_tokens)

    def observe(self, outs: list[EngineOutput], now: float, batch: MetricsBatch | None = None) -> None:
        """`batch`: count the tokens and inter-token latencies there (its flush() does), else now."""
        m = self.m
        own = batch is None
        if own:
            batch = MetricsBatch(m, now)
        for o in outs:
            if not self.scheduled and o.first_scheduled_time is not None:
                self.scheduled = True
                m.queue_time.observe(max(o.first_scheduled_time - self.arrival_time, 0.0))
            i, num_new = o.index, len(o.new_token_ids)
            if num_new:
                if not self.first_token:
                    self.first_token = True
                    m.ttft.observe(now - self.arrival_time)
                batch.add(num_new, now - self.last_token_time[i], self.num_tokens[i] == 0)
                self.num_tokens[i] += num_new
                self.last_token_time[i] = now
            if o.finished and not self.finished[i]:
                self.finished[i] = True
                m.finished(o.finish_reason)
                m.request_generation_tokens.observe(self.num_tokens[i])
        if all(self.finished) and not self.done:
            self.done = True
            m.e2e.observe(now - self.arrival_time)
        if own:
            batch.flush()

    def close(self, reason: str = "abort") -> None:
        """The stream ended early (the caller went away): count the unfinished sequences."""
        if self.done:
            return
        self.done = True
        count_unfinished(self.m, self.finished, self.num_tokens, reason)
