"""The one `Request` object that flows through the engine, and the one finish-reason table
(torch-free: the router and the proto conversion use the table too).

    WAITING --schedule--> RUNNING --update--> FINISHED_*
       |  ^                  |
       |  +-- PREEMPTED <----+   (blocks ran out: KV dropped, recomputed later)
       +--> WAITING_FOR_KV --+   (a KV connector loads the prompt's KV from elsewhere; then
                                  WAITING with the prompt computed, or recomputed if the load failed)

A request is one *sequence*: a prompt with n > 1 becomes n requests (`index` 0..n-1 of the user's
request `parent_id`) that share the prompt's KV blocks through the prefix cache. Statuses are
ordered: everything > PREEMPTED is finished.
"""

from __future__ import annotations

import enum
import time

from pdserve.common.block_hash import BlockHash, hash_blocks
from pdserve.common.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    WAITING_FOR_KV = enum.auto()  # blocks reserved, a KV connector is filling them
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()  # client went away / abort()
    FINISHED_ERROR = enum.auto()  # the engine failed this request

    def is_finished(self) -> bool:
        return self > _LAST_UNFINISHED  # a module constant: `RequestStatus.X` is a slow class lookup


_LAST_UNFINISHED = RequestStatus.PREEMPTED

# The one table from finish statuses to finish reasons: OpenAI's `finish_reason` strings, the
# proto's FinishReason enum (FINISH_REASON_<NAME>, proto/convert.py) and the metrics' labels.
FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}
FINISH_REASON_NAMES = tuple(FINISH_REASONS.values())


def child_request_id(request_id: str, index: int, n: int) -> str:
    """The engine id of sequence `index` of a user request with n sequences."""
    return request_id if n == 1 else f"{request_id}#{index}"


def sequence_seed(seed: int | None, index: int) -> int | None:
    """Sequence `index` of a seeded request samples from seed + index (vLLM's rule for n > 1)."""
    return None if seed is None else seed + index


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = (), arrival_time: float | None = None,
                 output_token_ids: list[int] | None = None, parent_id: str | None = None, index: int = 0,
                 kv_transfer: object | None = None):
        self.request_id = request_id
        self.parent_id = parent_id if parent_id is not None else request_id  # the user's request
        self.index = index  # which of the parent's n sequences this is
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        # Tokens given at admission as already generated (a resubmitted request continues after them).
        self.output_token_ids: list[int] = list(output_token_ids or [])
        self.all_token_ids: list[int] = self.prompt_token_ids + self.output_token_ids
        self.num_computed_tokens = 0  # tokens scheduled through the model (advanced when scheduled)
        self.num_inflight = 0  # tokens being sampled by a launched step, not yet appended (0 or 1)
        self.num_cached_tokens: int | None = None  # prompt tokens hit in the prefix cache (first schedule)
        self.num_computed_prompt_tokens = 0  # prompt tokens this engine actually ran through the model
        self.num_preemptions = 0
        self.block_ids: list[int] = []  # owned by KVCacheManager
        self._block_hashes: list[BlockHash] = []
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        # per generated token: (chosen logprob, {token_id: (logprob, rank)}) when logprobs requested
        self.logprobs: list[tuple[float, dict[int, tuple[float, int]]]] = []
        self.prompt_logprobs: list[dict[int, tuple[float, int]] | None] = []
        self.cumulative_logprob = 0.0
        # Opaque to the engine: what a KV connector needs to load or hand off this request's KV
        # (common/kv_transfer/connector.py). None: an ordinary request.
        self.kv_transfer = kv_transfer
        self.num_external_tokens: int | None = None  # prompt tokens a KV connector loads (None: not asked)
        self.num_sent_tokens = len(self.output_token_ids)  # output tokens already reported (EngineOutput)
        self.num_sent_logprobs = 0
        self.reported = False  # the first EngineOutput (with the prompt's numbers) went out

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def is_finished(self) -> bool:
        return self.status.is_finished()

    def finishes_with_inflight(self, max_model_len: int) -> bool:
        """The token in flight certainly ends this request (length limits; EOS is not known yet)."""
        if not self.num_inflight:
            return False
        total, outputs = self.num_tokens + self.num_inflight, self.num_output_tokens + self.num_inflight
        if total >= max_model_len:
            return True
        p = self.params
        return p.max_tokens is not None and outputs >= max(p.max_tokens, p.min_tokens)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def block_hashes(self, block_size: int, extra: bytes = b"") -> list[BlockHash]:
        """Hashes of all full blocks of the known tokens, extended incrementally."""
        num_full = self.num_tokens // block_size
        if len(self._block_hashes) < num_full:
            parent = self._block_hashes[-1] if self._block_hashes else None
            self._block_hashes += hash_blocks(self.all_token_ids, block_size, extra, parent,
                                              start_block=len(self._block_hashes))
        return self._block_hashes

    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens})")
