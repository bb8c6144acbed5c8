"""The data objects at the engine step's boundaries: schedule() -> execute() -> update().

`SchedulerOutput` says which tokens of which requests run this step (ids and ints only);
`RunnerOutput` says what the model produced for them. Neither holds scheduler state, so the
model runner can live in another process (tensor parallel workers) without change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.common.sampling_params import SamplingParams


# An input token not known on the host yet: the one the step in flight samples for this request.
# The runner fills it on the device from that step's sampled tokens (overlapped scheduling).
PLACEHOLDER_TOKEN = -1


@dataclass
class ScheduledRequest:
    req_id: str
    input_token_ids: list[int]  # tokens at positions [start_pos, start_pos + len) to run this step
    start_pos: int  # = num_computed_tokens before this step
    block_ids: list[int]  # the request's whole block table
    sample: bool  # this chunk reaches the end of the known tokens: sample a next token
    params: SamplingParams
    prompt_token_ids: list[int]  # for penalties and prompt logprobs (shared references, not copies)
    output_token_ids: list[int]
    # Speculative decoding (spec_decode/): KV slots the scheduler reserved past the known tokens
    # for drafts; the runner proposes at most that many and appends them to input_token_ids
    # (spec_token_ids, runner side only).
    num_spec_slots: int = 0
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)  # runner drops their cached state
    preempted_req_ids: set[str] = field(default_factory=set)
    # False: no scheduled request's sampling reads its token history or reports logprobs
    # (SamplingParams.needs_host_history), so the runner skips those per-row checks
    any_host_history: bool = True
    # every sampled row is plain greedy (engine/greedy_tail.py): decided on rank 0 and carried to
    # the other tensor-parallel ranks in the step message; None: the runner checks the params
    all_greedy: bool | None = None
    # speculative decoding under tensor parallelism: rank 0's SpecDecoder verifies this step (its
    # drafts travel as the requests' spec_token_ids), so the other ranks join the verify's collectives
    spec_verifies: bool = False

    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class RunnerOutput:
    # req_id -> sampled token (only for requests with sample=True)
    sampled_token_ids: dict[str, int]
    # req_id -> (chosen token logprob, {token_id: (logprob, rank)}) when logprobs were requested
    logprobs: dict[str, tuple[float, dict[int, tuple[float, int]]]] = field(default_factory=dict)
    # req_id -> prompt logprob entries for the prompt tokens covered by this step's chunk
    prompt_logprobs: dict[str, list[dict[int, tuple[float, int]] | None]] = field(default_factory=dict)
    # Speculative decoding: req_id -> the drafts it fed, and how many of them were accepted; the
    # accepted ones come before its sampled token (which corrects the first rejected draft or
    # follows the last accepted one).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    num_accepted_tokens: dict[str, int] = field(default_factory=dict)
    # req_id -> (position, token): drafts proposed while the input token at `position` was in
    # flight start with a guess of it (spec_decode/ngram.py); update() tells whether it was right.
    guessed_token_ids: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Requests of a bridge step (spec_decode/pipeline.py) that got no token: the verify step before
    # accepted more drafts than the bridge had rows; update() takes back their token in flight.
    void_req_ids: set[str] = field(default_factory=set)
    # req_id -> (drafts found, drafts accepted) of each verify round of a step that chained rounds
    # on the device (spec_decode/device_rounds.py): its tokens travel as spec_token_ids, all
    # accepted, and the counters take these instead
    spec_rounds: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
