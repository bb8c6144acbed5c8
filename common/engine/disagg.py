"""The engine's two halves of a KV handoff (prefill side and decode side), on one EngineCore.

Prefill role:   add_prefill(...)       run the prompt, sample the first token(s), then keep
                                       the prompt's blocks under a lease (ttl) instead of freeing
                resolve_lease(id)      -> block ids, read by the KV server while the lease lives
                release_lease(id)      decode pulled them (or gave up): the blocks go back

Decode role:    prepare_pull(...)      the request with its first token(s); blocks for the prompt
                                       are reserved (own prefix hits first): -> blocks to fill
                ... the KV transport fills them, outside the engine thread ...
                admit_pulled(id, ok)   ok: computed = prompt, joins the batch at the first token;
                                       not ok: blocks freed, the prompt is recomputed here

All methods run on the engine thread (AsyncLLM.call_in_engine) except resolve_lease, which only
reads a dict and may be called from the transport's event loop.
"""

from __future__ import annotations

import dataclasses
import time

from pdserve.common.engine.engine_core import EngineCore
from pdserve.common.engine.output_processor import ParentRequest
from pdserve.common.request import Request
from pdserve.common.sampling_params import SamplingParams


class PrefillHandoff:
    def __init__(self, core: EngineCore, lease_ttl_s: float = 30.0):
        self.core = core
        self.lease_ttl_s = lease_ttl_s

    def prefill_params(self, params: SamplingParams) -> SamplingParams:
        """The prefill samples only the first token of each sequence."""
        return dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=[])

    def add_prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> str:
        lease_id = f"{request_id}@{time.monotonic_ns()}"
        self.core.add_request(request_id, prompt_token_ids, self.prefill_params(params))
        first = self.core.outputs.parents[request_id].children[0]
        first.kv_lease = (lease_id, time.monotonic() + self.lease_ttl_s)
        return lease_id

    def resolve_lease(self, lease_id: str) -> list[int] | None:
        return self.core.kv.lease_block_ids(lease_id, time.monotonic())

    def release_lease(self, lease_id: str) -> bool:
        return self.core.kv.release_lease(lease_id)

    def expire_leases(self, core: EngineCore | None = None) -> int:
        return self.core.kv.expire_leases(time.monotonic())


class DecodeHandoff:
    def __init__(self, core: EngineCore):
        self.core = core
        self.pending: dict[str, ParentRequest] = {}

    def prepare_pull(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     output_token_ids: list[list[int]], num_kv_tokens: int) -> tuple[list[int], int] | None:
        """Register the request and reserve blocks for `num_kv_tokens` prompt tokens. Returns
        (destination block ids, leading blocks already cached here), or None when the pool is short
        (the request then simply queues and recomputes)."""
        core = self.core
        core.validate(prompt_token_ids, params)
        parent = ParentRequest(request_id, None, list(prompt_token_ids), params, time.time())
        for i, done in enumerate(output_token_ids):
            child_params = params if params.n == 1 else dataclasses.replace(
                params, n=1, seed=None if params.seed is None else params.seed + i)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            parent.children.append(Request(child_id, prompt_token_ids, child_params, core.eos_token_ids,
                                           parent.arrival_time, output_token_ids=done))
        core.outputs.add(parent)
        self.pending[request_id] = parent  # queued by admit_pulled, pulled or not
        dst, num_hits = core.kv.reserve_for_pull(parent.children[0], num_kv_tokens)
        return None if num_hits < 0 else (dst, num_hits)

    def admit_pulled(self, request_id: str, ok: bool, num_kv_tokens: int) -> bool:
        parent = self.pending.pop(request_id, None)
        if parent is None:
            return False  # aborted meanwhile
        first = parent.children[0]
        if ok:
            self.core.kv.commit_pulled(first, num_kv_tokens)
        else:
            self.core.kv.free(first)
        self._queue(parent)
        return True

    def abort_pending(self, request_id: str) -> None:
        parent = self.pending.pop(request_id, None)
        if parent is not None:
            self.core.kv.free(parent.children[0])
            self.core.outputs.parents.pop(request_id, None)
            for c in parent.children:
                self.core.outputs.child_to_parent.pop(c.request_id, None)

    def _queue(self, parent: ParentRequest) -> None:
        for child in parent.children:
            self.core.scheduler.add_request(child)
