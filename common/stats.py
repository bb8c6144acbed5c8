"""Typed snapshots of what engines, workers and routers count (torch-free).

`/metrics` (common/metrics.py), the registry heartbeat, gRPC Health and `/admin/stats` all read
these dataclasses; nothing reads a counter by a string key with a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """One engine's gauges and counters (`EngineCore.stats()`), or a fleet's sums (the router)."""
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_cached_blocks: int = 0  # blocks holding a prefix-cache hash
    num_preemptions: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # prompt tokens found there
    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    tensor_parallel_size: int = 1
    # KV blocks each rank's memory could hold; every rank holds num_blocks (their min)
    kv_blocks_fit_by_rank: list[int] = field(default_factory=list)
    spec_decode: SpecDecodeStats | None = None  # None: no speculative decoding configured


@dataclass
class SpecDecodeStats:
    """Speculative decoding counters, as vLLM's spec_decode metrics: a draft is one request's
    drafts verified in one step; accepted_per_pos[i] counts drafts accepted at position i."""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    # drafts proposed while their request's input token was in flight (spec_decode/pipeline.py),
    # and of them those whose guess of that token was right
    num_guessed_drafts: int = 0
    num_guess_hits: int = 0

    @classmethod
    def new(cls, num_speculative_tokens: int) -> "SpecDecodeStats":
        return cls(accepted_per_pos=[0] * num_speculative_tokens)

    def record(self, drafts: dict[str, list[int]], num_accepted: dict[str, int], guess_hits: list[bool] = (),
               rounds: dict[str, list[tuple[int, int]]] | None = None) -> None:
        """A step's drafts fed and accepted per request; `rounds`: the (found, accepted) of each
        verify round of requests that chained rounds on the device (their `drafts` are the
        step's tokens then, not counted)."""
        rounds = rounds or {}
        for req_id, fed in drafts.items():
            if req_id not in rounds:
                self._add(len(fed), num_accepted[req_id])
        for per_round in rounds.values():
            for found, accepted in per_round:
                if found:  # a round without drafts is a plain step's token, as a step without drafts
                    self._add(found, accepted)
        self.num_guessed_drafts += len(guess_hits)
        self.num_guess_hits += sum(guess_hits)

    def _add(self, fed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += fed
        self.num_accepted_tokens += accepted
        for i in range(accepted):
            self.accepted_per_pos[i] += 1

    def snapshot(self) -> "SpecDecodeStats":
        return dataclasses.replace(self, accepted_per_pos=list(self.accepted_per_pos))

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens per verify step: 1 (the target's own) + accepted drafts, averaged (vLLM's
        'mean acceptance length')."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None


@dataclass
class TransferStats:
    """A worker's KV handoff counters: leases it granted (prefill half), pulls it made (decode half)."""
    leases_granted: int = 0
    leases_released: int = 0
    leases_expired: int = 0
    leases_active: int = 0
    bytes_sent: int = 0
    pulls_served: int = 0
    serve_failures: int = 0
    pulls: int = 0
    pull_failures: int = 0
    bytes_received: int = 0
    pull_seconds: float = 0.0
    new_pull_latencies: list[float] = field(default_factory=list)  # since the last scrape


@dataclass
class RouterStats:
    """A router's counters of the requests it routed (`/admin/stats`, `/metrics`)."""
    prefill_retries: int = 0
    decode_resubmits: int = 0
    decodes_on_prefill: int = 0  # requests decoded on a prefill while no decode instance served
    kv_bytes: int = 0  # KV bytes decode pulled for this router's requests
    handoffs: int = 0  # requests whose prompt KV was pulled from a prefill
    recomputed_prompt_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    requests_by_instance: dict[str, int] = field(default_factory=dict)
    prompt_tokens_by_instance: dict[str, int] = field(default_factory=dict)
    cached_tokens_by_instance: dict[str, int] = field(default_factory=dict)
    routes: dict[str, int] = field(default_factory=dict)  # decisions by reason (routing.py)

    def count(self, table: str, key: str, value: int = 1) -> None:
        counts = getattr(self, table)
        counts[key] = counts.get(key, 0) + value


@dataclass
class GpuStats:
    """One GPU as NVML reports it (common/gpu_metrics.py); only where the engine runs on CUDA."""
    index: int  # the engine's CUDA device index
    memory_used_bytes: int = 0  # the whole device's, every process
    memory_total_bytes: int = 0
    utilization: float = 0.0  # fraction of the last sample period a kernel ran, 0..1
