"""KVConnector: the engine's one seam to a KV handoff between engines (disaggregated serving).

The scheduler calls it at two moments of a request's life and nowhere else; `Request` carries one
opaque field for it (`kv_transfer`). Aggregated `serve` and the offline `LLM` pass no connector.

    producer (prefill worker)                       consumer (decode worker)
    ...request runs, first token sampled...         admission of a WAITING request:
    request_finished(req) -> (lease id, expiry)       num_external_tokens(req) -> n (0: compute here)
      the scheduler leases the prompt's blocks        the scheduler reserves blocks for n tokens
      (KVCacheManager.lease) instead of freeing       (own prefix hits first), status WAITING_FOR_KV,
      them; the KV server reads them until the        start_load(req, block ids to fill, hit blocks)
      consumer releases them or the lease expires   each schedule(): finished_loads() -> (id, ok):
                                                      ok: prompt computed, back to WAITING;
                                                      not ok: blocks freed, the prompt is recomputed
                                                    a request finished while loading keeps its blocks
                                                      until the load reports back (it may still write)

Every method runs on the engine thread. `bind` hands the connector the KV manager and a `wake`
callback (a load that finishes must wake an idle engine loop).
"""

from __future__ import annotations

from typing import Callable

from pdserve.common.request import Request


class KVConnector:
    """Base: no handoff. Subclasses override the half they implement."""

    def bind(self, kv, wake: Callable[[], None]) -> None:
        self.kv = kv
        self.wake = wake

    # ---- producer --------------------------------------------------------------------------
    def request_finished(self, req: Request) -> tuple[str, float] | None:
        """At the end of `req` (stopped or length): (lease id, time.monotonic() expiry) to keep its
        prompt's blocks for a consumer, or None to free them as usual."""
        return None

    # ---- consumer --------------------------------------------------------------------------
    def num_external_tokens(self, req: Request) -> int:
        """Prompt tokens of `req` whose KV will be loaded from elsewhere (0: compute them here)."""
        return 0

    def skip_load(self, req: Request) -> None:
        """The pool had no room for the load: `req` is computed here instead."""

    def start_load(self, req: Request, block_ids: list[int], num_cached_blocks: int) -> None:
        """Fill `block_ids` (the blocks after the first `num_cached_blocks`, which this engine
        already holds) with the KV of `req`'s first num_external_tokens tokens, asynchronously."""
        raise NotImplementedError

    def finished_loads(self) -> list[tuple[str, bool]]:
        """(request id, succeeded) of the loads finished since the last call."""
        return []

    def cancel_load(self, req: Request) -> None:
        """`req` finished while loading: stop the load if possible (it still reports back)."""

    def on_step(self) -> None:
        """After each engine step and while idle (lease expiry)."""
