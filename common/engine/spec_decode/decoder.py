"""SpecDecoder: the model runner's hook for speculative decoding (see __init__.py for the step).

    launch(sched):  scheduled = prepare(sched)     # drafts appended: inputs [t, d1 .. dn]
                    hidden = target forward        # a speculating request is a small chunk
                    verify(hidden, step, ...)      # logits at its n + 1 last rows -> queued
                                                   #   device work, one readback
    result():       finish(readback on the host)   # accepted drafts + one token per request

Requests with and without drafts share the batch: `verify` samples the others with the
runner's own sampler, on their last row as usual. Where the runner has CUDA graphs (CUDA, not
--enforce-eager) a step of decodes and [t, d1 .. dn] chunks runs as one-token rows, each
attending to its own prefix (`as_rows`: the flattened chunks re-indexed as rows in numpy), so a
verify step is a decode-only step and replays the decode graphs (up to max_num_seqs rows; beyond,
or mixed with prefill chunks, it runs eagerly as chunks). The CPU runs such steps as one-token
rows too (its decode attention reads the blocks in place). The draft model's steps do the same with
its own graphs. On CPU an n-gram step feeds only the drafts worth their rows (budget.py).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from pdserve.common.config import SpeculativeConfig
from pdserve.common.engine.model_runner import position_seed
from pdserve.common.engine.outputs import PLACEHOLDER_TOKEN, RunnerOutput, ScheduledRequest, SchedulerOutput
from pdserve.common.engine.spec_decode import speculates
from pdserve.common.engine.sampler import to_device
from pdserve.common.engine.spec_decode.rejection import DraftRows, queue_verify
from pdserve.common.models.attention import StepInputs


# A draft model's greedy drafts stay on the device: the verify step is launched right behind the
# draft's last round, its draft inputs filled there, and the drafts come back with its result
# (DraftModelProposer.propose_on_device), instead of the host waiting for the drafts first.
DEFER_DRAFTS = True
# ... and behind such a verify step of at most this many drafting requests the draft model samples
# the next proposals' first drafts (draft_ahead). One H200, SmolLM2 bf16, self-draft k = 8: batch 1
# 7.01 against 7.48 ms a verify step without either; batch 16 10.78 against 10.14 (its 32-row round
# and host work when not every request keeps its draft), where deferred drafts alone made 1.37
# against 1.47 ms per token (docs/benchmarks.md, fifteenth session).
AHEAD_MAX_REQUESTS = 3
# Not on the CPU, where the host runs the forward passes itself: nothing overlaps the ahead round
# there and a dropped one is a forward pass lost (SmolLM2 bf16 self-draft, this 2-core host:
# 24.05 against 22.36 ms per token with it, 4 prompts, 96 tokens). Tests lift it to run the round.
AHEAD_ON_CPU = False
COOL_MAX = 16  # the longest cool-down (steps) of a request whose drafts keep being rejected
# as_rows marks each request's rows as a group (the Triton decode attention reads their K/V once)
# only from this much context on: one program per group's tile of n * G query rows pays where the
# K/V is long, while on a short context the per-row programs finish sooner. One H200, SmolLM2 bf16,
# a 9-row verify graph, grouped vs not: 0.947 vs 0.825 ms at 150 tokens of context, 0.958 vs 0.990
# at 600, 0.886 vs 1.688 at 2,000 (docs/benchmarks.md, tenth session).
GROUPED_MIN_CONTEXT = 512


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, runner, follower: bool = False):
        """Before the target's KV pool exists: a draft model's shape is read (for the pool's
        size), its weights are loaded in `start`. `follower`: a tensor-parallel rank > 0, which
        proposes nothing: rank 0 sends each step's drafts with it (tp_workers.encode_step) and this
        rank runs the same rows and joins the same collectives (`follow`)."""
        self.config = config
        self.runner = runner
        self.follower = follower
        self._prepared: tuple | None = None  # (the SchedulerOutput, prepare()'s requests for it)
        if follower:  # (a draft model runs on rank 0 alone)
            self.proposer = self.draft = None
        elif config.method == "ngram":
            from pdserve.common.engine.spec_decode.ngram import NgramProposer
            self.proposer = NgramProposer(config)
            self.draft = None
        else:
            from pdserve.common.engine.spec_decode.draft_model import DraftModelProposer
            self.proposer = self.draft = DraftModelProposer(
                config, runner.model_cfg, runner.arch, runner.max_model_len, runner.scheduler_cfg,
                runner.enforce_eager)
        self._probs: dict[str, torch.Tensor | None] = {}  # this step: req_id -> draft distributions
        self._drafts: dict[str, list[int]] = {}  # this step: req_id -> all drafts (fed + a last one)
        self._fed: dict[str, list[int]] = {}  # this step: req_id -> the drafts fed
        self._deferred = None  # this step's DeviceDrafts (DEFER_DRAFTS): its drafts known at its result
        self._ahead = None  # this verify step's draft_ahead work: (items, pairs, holder of the _Ahead)
        self.num_deferred_verifies = 0  # verify steps launched before their drafts reached the host
        # Verify [t, d1 .. dn] as n + 1 one-token rows (each attends to its prefix: the K/V of all
        # rows are stored before attention reads, layer by layer), so a verify step is a
        # decode-only step that the CUDA graphs replay. Set in start(): where graphs exist.
        self.verify_as_decodes = False
        self._as_rows = False  # the step being launched runs as one-token rows (as_rows)
        self._row_groups = False  # as_rows marks row groups (CUDA: the CPU's attention reads rows alone)
        self.num_row_steps = 0  # steps run as one-token rows (tests: the CUDA form ran)
        self.num_tail_verifies = 0  # verify / bridge steps whose tokens came from the tail graph (greedy)
        self._cool: dict[str, list[int]] = {}  # req_id -> [steps left without drafting, last cool-down]
        self.num_cooled = 0  # request-steps that did not draft, cooling down (_cool_down)
        self._propose_seconds = 0.0  # host time in proposers (bench spec: the draft's cost); `propose_seconds`
        self._ahead_timers: list = []  # draft_ahead rounds' device times, read once their rounds are done
        self.prefill_seconds = 0.0  # host time feeding prompts to the draft model (prefill_draft)
        self.sampled_index: dict[str, int] = {}  # the last verify step's: req_id -> its token's index in the readback
        self._launched = ({}, set(), [])  # the last verify step's (guesses, dropped req ids, req ids with drafts)
        # Bridge steps (pipeline.py): this step's req_id -> rows, one per number of drafts the verify
        # step in flight may accept for it (which row counts is set once that result is in)
        self._bridge: dict[str, int] = {}
        self._void: set[str] = set()  # bridged requests whose outcome had no row (result: no token)
        self._settle = None  # the bridge step's: its rows chosen once the verify result is in
        self.num_bridge_steps = 0
        self.num_bridge_void = 0  # bridged requests that had no row for their outcome
        # n-gram drafts fed by their expected tokens against the rows' cost (budget.py); set in start()
        self.budget = None
        self._step_tokens = 0  # the step being launched: its tokens, drafts included
        self._decode_only = False  # ... and whether every request in it is a decode or a verify chunk
        # a lone greedy request's verify rounds chained on the device (device_rounds.py); set in start()
        self.device_rounds = None
        self.looped = False  # the step being launched ran device rounds: the next waits for its result

    def draft_bytes_per_block(self, block_size: int) -> int:
        return 0 if self.draft is None else self.draft.draft_bytes_per_block(block_size)

    def reserved_bytes(self) -> int:
        """GPU memory outside the KV pool that the draft needs (its weights)."""
        return 0 if self.draft is None else self.draft.weight_bytes()

    def start(self) -> None:
        # CUDA: the decode graphs replay the rows; CPU: the decode attention reads each row's K/V in
        # place, where a chunk gathers its request's whole cached prefix (~0.7 ms per drafting
        # request and step for SmolLM2 at batch 16: docs/benchmarks.md)
        self.verify_as_decodes = self.runner.graphs is not None or self.runner.device.type == "cpu"
        self._row_groups = self.runner.device.type == "cuda"
        policy = self.config.draft_budget
        if policy == "auto":  # a step's wall time is its cost where the forward runs on the host
            policy = "cost" if self.runner.device.type == "cpu" else "all"
        if policy == "cost" and self.draft is None and not self.follower:
            from pdserve.common.engine.spec_decode.budget import DraftBudget
            self.budget = DraftBudget()
        if self.draft is not None:
            self.draft.start(self.runner.num_blocks, self.runner.block_size)
        from pdserve.common.engine.spec_decode.device_rounds import DeviceRounds, resolve_rounds
        rounds = resolve_rounds(self.config.device_rounds, self.runner.device)
        if rounds and self.draft is None and self.runner.tp is None:
            self.device_rounds = DeviceRounds(self.runner, self.config.num_speculative_tokens,
                                              self.config.prompt_lookup_min, self.config.prompt_lookup_max, rounds)

    @property
    def rounds_per_step(self) -> int:
        """Verify rounds a lone greedy request's step may chain on the device (0: none; the
        scheduler reserves their slots)."""
        return 0 if self.device_rounds is None else self.device_rounds.rounds

    def rounds_in(self, sched: SchedulerOutput) -> int:
        """Device rounds of a step the scheduler gave room for them (one request, more draft
        slots than k); 0 for any other step."""
        self.looped = False
        if self.device_rounds is None or len(sched.scheduled) != 1:
            return 0
        s = sched.scheduled[0]
        return self.device_rounds.wants(s) if s.num_tokens == 1 and s.sample else 0

    def launch_rounds(self, sched: SchedulerOutput, num_rounds: int, out: RunnerOutput):
        """-> (readback, finish) of DeviceRounds.launch for the step's request, the per-step state
        reset as for a step without drafts."""
        self._drafts, self._probs, self._fed, self._launched = {}, {}, {}, ({}, set(), [])
        self._deferred = self._ahead = None
        self._bridge, self._void, self._settle = {}, set(), None
        self._as_rows = self._decode_only = False
        self._step_tokens = 0
        self._prepared = None
        self.looped = True
        return self.device_rounds.launch(sched.scheduled[0], num_rounds, out)

    def prefill_draft(self, sched: SchedulerOutput) -> None:
        """After a step is queued: its prompt chunks into the draft model's KV (draft_model.py).
        Timed apart from proposing (prefill_seconds): it is the draft's share of the prompt, paid once
        per request in the prefill step, not per verify step."""
        if self.draft is None or self.draft.runner is None:  # (runner: none in the KV sizing's profile step)
            return
        t0 = time.perf_counter()
        if self.draft.prefill(sched.scheduled):
            self.prefill_seconds += time.perf_counter() - t0

    def prepare(self, sched: SchedulerOutput) -> list[ScheduledRequest]:
        """The step's requests, those with draft slots carrying up to num_spec_slots drafts (once
        per step: a tensor-parallel rank 0 prepares before sending the step, then launches it)."""
        if self._prepared is not None and self._prepared[0] is sched:
            return self._prepared[1]
        out = self._follow_prepare(sched) if self.follower else self._prepare(sched)
        self._prepared = (sched, out)
        return out

    def _follow_prepare(self, sched: SchedulerOutput) -> list[ScheduledRequest]:
        """A follower's step arrives with its drafts in the inputs (spec_token_ids): the same state
        as rank 0's prepare() left, nothing proposed."""
        self._fed = {s.req_id: list(s.spec_token_ids) for s in sched.scheduled if s.spec_token_ids}
        self._drafts, self._probs = dict(self._fed), dict.fromkeys(self._fed)
        if sched.spec_verifies and not self._drafts:  # (a draft model at T > 0 drafting with no slot to feed)
            self._drafts = {s.req_id: [] for s in sched.scheduled if s.sample}
        self._launched, self._deferred, self._ahead = ({}, set(), []), None, None
        self._bridge, self._void, self._settle = {}, set(), None
        self._decode_only = all(len(s.input_token_ids) - len(s.spec_token_ids) == 1 for s in sched.scheduled)
        self._as_rows = self.verify_as_decodes and bool(self._fed) and self._decode_only
        return sched.scheduled

    def follow(self, hidden: torch.Tensor, step: StepInputs, ordered: list[ScheduledRequest], greedy: bool) -> None:
        """A follower's part of `verify`: the collectives rank 0's makes for the same rows (the
        tail graph's all-gather, or the logits gather), nothing sampled here."""
        runner, flat = self.runner, []
        for s, end in zip(ordered, step.query_start_loc[1:].tolist()):
            if s.sample:
                flat += range(end - len(s.spec_token_ids) - 1, end)
        if greedy and runner._step_graphed and runner.graphs.can_run_tail():
            runner.graphs.run_tail(step.num_tokens)
            return
        runner.model.compute_logits(hidden.index_select(0, to_device(flat, torch.int64, hidden.device)))

    def _prepare(self, sched: SchedulerOutput) -> list[ScheduledRequest]:
        # A draft model at temperature > 0 also drafts the token after the fed drafts, even with
        # no slot to feed any (draft_model.py: every position is then decided the same way).
        want = [s for s in sched.scheduled if s.num_spec_slots or (
            self.draft is not None and s.sample and s.params.temperature != 0
            and speculates(s.params, len(s.output_token_ids)))]
        if self.draft is not None:  # it drafts from the history on the device: never past a token in flight
            want = [s for s in want if s.input_token_ids[-1] != PLACEHOLDER_TOKEN]
        bridge = self._bridges(sched)
        if bridge:  # their input is one of several tokens in flight: nothing to look up past
            want = [s for s in want if s.req_id not in bridge]
        if len(want) > 1 and self._cool:  # in a batch: requests cooling down after rejections do not draft
            want = self._cool_down(want)
        self._drafts, self._probs, self._fed, self._launched = {}, {}, {}, ({}, set(), [])
        self._deferred = self._ahead = None
        self._bridge, self._void, self._settle = bridge, set(), None
        self._as_rows = False
        self._decode_only = all(s.num_tokens == 1 for s in sched.scheduled)
        if not want and not bridge:
            self._step_tokens = len(sched.scheduled) if self._decode_only else 0
            return sched.scheduled
        if self._defers(want, sched):  # the drafts' values: placeholders, filled on the device
            deferred = self._deferred = self.draft.propose_on_device(want)
            for req_id, n in deferred.counts.items():
                self._drafts[req_id], self._probs[req_id] = [PLACEHOLDER_TOKEN] * n, None
        else:
            t0 = time.perf_counter()
            for req_id, (drafts, probs) in (self.proposer.propose(want) if want else {}).items():
                self._drafts[req_id], self._probs[req_id] = drafts, probs
            self._propose_seconds += time.perf_counter() - t0
        limits = self._limits(sched, bridge)
        out = []
        for s in sched.scheduled:
            rows = bridge.get(s.req_id)
            if rows:  # [x0 .. xn] at the positions after its verified input, all filled on the device
                out.append(dataclasses.replace(s, input_token_ids=[PLACEHOLDER_TOKEN] * rows))
                continue
            drafts = self._drafts.get(s.req_id)
            n = s.num_spec_slots if limits is None else limits.get(s.req_id, 0)
            fed = self._fed[s.req_id] = drafts[:n] if drafts else []
            if drafts and not fed and limits is not None:  # not worth a row: sampled as a plain decode
                del self._drafts[s.req_id], self._probs[s.req_id]
            out.append(dataclasses.replace(s, input_token_ids=s.input_token_ids + fed, spec_token_ids=fed)
                       if fed else s)
        self._step_tokens = sum(len(s.input_token_ids) for s in out)
        self.num_bridge_steps += bool(bridge)
        if self._deferred is not None:  # the target's placeholder fill reads the drafts' runs
            self.runner._last_sampled = (self._deferred.tokens, self._deferred.offsets)
        # every request a decode or a [t, d1 .. dn] chunk: the step may run as one-token rows (as_rows)
        self._as_rows = self.verify_as_decodes and (bool(bridge) or any(self._fed.values())) and self._decode_only
        return out

    @property
    def propose_seconds(self) -> float:
        """Time spent drafting: the proposers' host time, a draft model's device time where its
        drafts stay on the device (DEFER_DRAFTS), its ahead rounds included (waits for the last)."""
        self._add_ahead_times(wait=True)
        return self._propose_seconds

    def _add_ahead_times(self, wait: bool = False) -> None:
        """The device times of the ahead rounds that are done (all of them: wait) into the total."""
        left = []
        for timer in self._ahead_timers:
            if wait or timer.done():
                self._propose_seconds += timer.seconds(wait=True)
            else:
                left.append(timer)
        self._ahead_timers = left

    def draft_ahead(self) -> None:
        """After a verify step with greedy drafts is queued (its readback copy first): the draft
        model's round for the next proposals' first drafts, if every draft is accepted
        (DraftModelProposer.draft_ahead), so the device has it to run while the host applies the
        verify step's result."""
        pending, self._ahead = self._ahead, None
        if pending is not None and self.draft.runner is not None:
            items, pairs, holder = pending
            holder.append(self.draft.draft_ahead(items, pairs))

    def _ahead_fits(self, s: ScheduledRequest, pos: int, n: int) -> bool:
        """The ahead round for a request whose last draft is the input at `pos` may write the
        draft's KV at pos + 1 (a block the request holds already) and its next proposal would
        come: every draft accepted leaves it room for another token."""
        runner = self.runner
        if (pos + 1) // runner.block_size >= len(s.block_ids) or pos + 2 >= runner.max_model_len:
            return False
        p = s.params
        return p.max_tokens is None or len(s.output_token_ids) + n + 3 <= p.max_tokens  # (max_draft_tokens)

    def _defers(self, want: list[ScheduledRequest], sched: SchedulerOutput) -> bool:
        """This step's drafts stay on the device (DEFER_DRAFTS): a draft model's, every drafting
        request greedy (a random one's draft distributions and Leviathan rows are built on the host),
        and no input of the step in flight from an earlier one (the fill then reads the drafts alone)."""
        # (tensor parallelism: the drafts travel to the other ranks in the step message, from the host)
        return DEFER_DRAFTS and self.draft is not None and self.runner.tp is None and bool(want) \
            and all(s.params.temperature == 0 for s in want) \
            and all(s.input_token_ids[-1] != PLACEHOLDER_TOKEN for s in sched.scheduled)

    def _limits(self, sched: SchedulerOutput, bridge: dict[str, int]) -> dict[str, int] | None:
        """The budget's drafts per request for this step (budget.py); None: as many as have slots."""
        if self.budget is None or not self._drafts:
            return None
        offered = {s.req_id: min(len(self._drafts[s.req_id]), s.num_spec_slots)
                   for s in sched.scheduled if s.req_id in self._drafts}
        num_tokens = sum(bridge.get(s.req_id) or s.num_tokens for s in sched.scheduled)
        return self.budget.limits(offered, num_tokens, sum(1 for s in sched.scheduled if s.sample))

    def observe_step(self, seconds: float) -> None:
        """The wall time of the step just launched and finished (the runner measures it where the
        budget uses it: the forward ran on the calling thread)."""
        if self.budget is not None and self._decode_only and self._step_tokens:
            self.budget.observe_step(self._step_tokens, seconds)

    def _bridges(self, sched: SchedulerOutput) -> dict[str, int]:
        """The requests of `sched` that are bridged (pipeline.py): launched while the verify step
        they follow still runs (their input token is in flight) and whose drafts in it were kept
        -> req_id -> rows, one per possible number of accepted drafts (fewer when the scheduler
        reserved fewer slots: an outcome past them leaves the request without a token, `_void`)."""
        _, dropped, drafted = self._launched
        if not drafted or self.draft is not None:
            return {}
        fed = self._fed
        bridge = {}
        for s in sched.scheduled:
            if s.req_id in fed and fed[s.req_id] and s.req_id not in dropped and s.sample \
                    and s.input_token_ids == [PLACEHOLDER_TOKEN]:
                bridge[s.req_id] = min(len(fed[s.req_id]), s.num_spec_slots) + 1
        return bridge

    def as_rows(self, step: StepInputs) -> StepInputs:
        """The StepInputs to run `step` (flattened from prepare()'s requests) with: where verify
        steps run as one-token rows (verify_as_decodes) and every request is a decode or a
        [t, d1 .. dn] chunk, its T tokens as T one-token rows, each attending to its own prefix
        (the K/V of all rows are stored before attention reads, layer by layer): a decode-only
        step, which the CUDA graphs replay. Rows are in token order, so row i's hidden state is
        token i's and everything indexed by token (verify's rows, the placeholder fill, sample
        rows) holds for both forms. Else `step` itself. Numpy over the tokens, no per-row objects."""
        if not self._as_rows or step.num_decodes == step.num_reqs:
            return step
        num_tokens = step.num_tokens
        self.num_row_steps += 1
        lens = np.diff(step.query_start_loc)
        req_of_token = np.repeat(np.arange(step.num_reqs), lens)  # [T]
        row_groups = None
        if self._row_groups and int(step.context_lens.max()) >= GROUPED_MIN_CONTEXT:  # a request's rows: a group
            row_groups = np.zeros(num_tokens, np.int32)
            row_groups[step.query_start_loc[:-1]] = lens
        return StepInputs(num_decodes=num_tokens, input_ids=step.input_ids, positions=step.positions,
                          slot_mapping=step.slot_mapping, query_start_loc=np.arange(num_tokens + 1, dtype=np.int32),
                          context_lens=step.positions + 1, block_table=step.block_table[req_of_token],
                          sample_rows=step.sample_rows, row_groups=row_groups)

    def _cool_down(self, want: list[ScheduledRequest]) -> list[ScheduledRequest]:
        """Per-request adaptive drafting, in batches only (at batch 1 a verify step costs about
        a plain one, and a skipped lookup only loses): a request whose drafts were all rejected
        sits out its next c steps' drafting, c doubling with each such round in a row (1, 2, 4 ..
        COOL_MAX), back to 0 when a round accepts any. Its rows would cost the batch's verify
        step device time and hold the whole batch's next step behind that result."""
        keep = []
        for s in want:
            cool = self._cool.get(s.req_id)
            if cool is not None and cool[0] > 0:
                cool[0] -= 1
                self.num_cooled += 1
            else:
                keep.append(s)
        return keep

    def _after_round(self, req_id: str, fed: int, accepted: int) -> None:
        """A verified round's outcome for the cool-down (`_cool_down`) and the budget."""
        if self.budget is not None:
            self.budget.observe_round(req_id, fed, accepted)
        if accepted:
            self._cool.pop(req_id, None)
        else:
            cool = self._cool.setdefault(req_id, [0, 0])
            cool[1] = min(max(1, 2 * cool[1]), COOL_MAX)
            cool[0] = cool[1]

    def forget(self, req_ids) -> None:
        """Finished or preempted requests: their proposer state and cool-down."""
        if self.proposer is not None:
            self.proposer.forget(req_ids)
        if self.budget is not None:
            self.budget.forget(req_ids)
        for req_id in req_ids:
            self._cool.pop(req_id, None)

    def has_drafts(self) -> bool:
        """The step being launched carries drafts: `verify` decides its tokens."""
        return bool(self._drafts)

    def verifies(self) -> bool:
        """`verify` samples the step being launched: it carries drafts or bridged requests."""
        return bool(self._drafts) or bool(self._bridge)

    def has_bridge(self) -> bool:
        """The step being launched bridges a verify step in flight (pipeline.py)."""
        return bool(self._bridge)

    def fills_runs(self) -> bool:
        """A request's input placeholders in the step being launched read a run of tokens from its
        index on (its k-th: index + k): bridge rows, or drafts left on the device."""
        return bool(self._bridge) or self._deferred is not None

    def bridge_void(self) -> bool:
        """Called once the result of the step before the one just launched is applied: settles a
        bridge step's rows (_when_verified) -> whether it bridged a request whose verify step
        accepted more drafts than the bridge had rows: that request gets no token from it, so
        the next step must wait for its result (the scheduler takes back its token in flight)."""
        settle, self._settle = self._settle, None
        if settle is not None:
            settle()
        return bool(self._void)

    def settle_guesses(self, requests: dict) -> bool:
        """Once the tokens the last launched step guessed are known (the result of the step
        before it applied; `requests`: the scheduler's running requests by id): the drafts of a
        request whose guess was wrong are dropped (its result is its row 0's token alone, which
        is the same token whether the drafts were accepted or not: n-gram drafts are one-hot).
        -> whether the launched step still has drafts whose acceptance decides where the next
        step starts (False: the next may launch before its result, as after a plain step)."""
        if not self._drafts:
            return False
        guessed, dropped, drafted = self._launched
        awaits = False
        for req_id in drafted:
            req = requests.get(req_id)
            if req is None:  # finished (or failed): nothing of it waits for this step
                dropped.add(req_id)
            elif req_id in guessed and guessed[req_id][0] < req.num_tokens:
                pos, token = guessed[req_id]
                if req.all_token_ids[pos] != token:
                    dropped.add(req_id)
                else:
                    awaits = True
            else:
                awaits = True
        return awaits

    def verify(self, hidden: torch.Tensor, step: StepInputs, ordered: list[ScheduledRequest],
               out: RunnerOutput, token_masks=None, greedy: bool = False):
        """Queue the tokens of every sampling request of a step with drafts, requests without
        drafts under their token masks (`token_masks`: the engine's StructuredOutputManager).
        `greedy`: every sampled row takes the plain argmax (greedy_tail.plain_greedy); after a
        decode graph its tail graph then gives every row's token, no logits or Sampler here.
        Nothing here waits for the device: -> (readback [N] int64 on the device, finish), and
        finish(readback as a host list) fills `out` (the runner's PendingOutput calls it after
        one copy to the host)."""
        runner = self.runner
        drafts, fed, probs = self._drafts, self._fed, self._probs  # this step's (prepare() resets them)
        rows: dict[str, list[int]] = {}  # req_id -> its sampling rows (a chunk's last n + 1, or n + 1 one-token rows)
        first: dict[str, ScheduledRequest] = {}
        bridge = self._bridge
        for s, end in zip(ordered, step.query_start_loc[1:].tolist()):
            if s.sample:
                n = bridge[s.req_id] if s.req_id in bridge else len(s.spec_token_ids) + 1
                rows.setdefault(s.req_id, []).extend(range(end - n, end))
                first.setdefault(s.req_id, s)
        spans, flat = {}, []  # req_id -> its first row in `logits`; the rows of `hidden` to take
        for req_id, r in rows.items():
            spans[req_id] = len(flat)
            flat += r
        consecutive = flat[-1] - flat[0] == len(flat) - 1  # (batch 1, or every request drafting)
        best = logits = None
        if greedy and runner._step_graphed and runner.graphs.can_run_tail():  # every row's token in one replay
            tokens = runner.graphs.run_tail(step.num_tokens)  # [T]: rows in token order (as_rows)
            best = tokens[flat[0]:flat[-1] + 1] if consecutive else tokens.index_select(
                0, to_device(flat, torch.int64, tokens.device))
            runner.num_greedy_tail_steps += 1
            self.num_tail_verifies += 1
        else:
            picked = hidden[flat[0]:flat[-1] + 1] if consecutive else hidden.index_select(
                0, to_device(flat, torch.int64, hidden.device))
            logits = runner.model.compute_logits(picked)  # [R, V]
        spec = [req_id for req_id in rows if req_id in drafts]
        draft_rows = []
        for req_id in spec:
            n = len(fed[req_id])
            draft_rows.append(DraftRows(first_row=spans[req_id], num_rows=n + 1,
                                        draft_token_ids=drafts[req_id][:n + 1], draft_probs=probs[req_id],
                                        params=first[req_id].params,
                                        first_position=int(step.positions[rows[req_id][0]]) + 1))
        bridged = [req_id for req_id in rows if req_id in bridge]
        for req_id in bridged:  # every row sampled (no drafts): row j decides the token at its position + 1
            draft_rows.append(DraftRows(first_row=spans[req_id], num_rows=bridge[req_id], draft_token_ids=[],
                                        draft_probs=None, params=first[req_id].params,
                                        first_position=int(step.positions[rows[req_id][0]]) + 1))
        readback, finish_spec = queue_verify(logits, draft_rows, runner.sampler.shared_generator, position_seed, best)
        plain = [req_id for req_id in rows if req_id not in drafts and req_id not in bridge]
        plain_at = [spans[req_id] for req_id in plain]  # each one's token in `readback` (tail: its row's)
        if plain and best is None:
            reqs = [first[req_id] for req_id in plain]
            rows_plain = logits.index_select(0, to_device(plain_at, torch.int64, logits.device))
            previous = runner._last_pending  # a masked row's input may be in flight (launched before its result)
            bitmask = None if token_masks is None else token_masks.fill(
                reqs, None if previous is None else lambda req_id: previous.result().sampled_token_ids[req_id])
            tokens = runner.sampler.sample(rows_plain, reqs, runner.arch.eos_token_ids,
                                           [runner.generator(s) for s in reqs], bitmask)
            out.logprobs = runner.sampler.logprobs(rows_plain, tokens, reqs)  # waits only where asked
            plain_at = list(range(readback.shape[0], readback.shape[0] + len(plain)))
            readback = torch.cat([readback, tokens])
        num_spec_values = readback.shape[0] - (len(plain) if best is None else 0)
        # where each request's first token lies in `readback` (a step launched before this one's
        # result fills its input from there: a request whose drafts were dropped, see settle_guesses)
        self.sampled_index = {req_id: spans[req_id] for req_id in spec}
        self.sampled_index.update(zip(plain, plain_at))
        if bridged:  # a bridged request's token is row `accepted`'s: known once the verify step's result is
            self._when_verified(runner._last_pending, bridged, spans, bridge)
        guesses = getattr(self.proposer, "guesses", {})
        for req_id in spec:  # drafts past a token in flight: the guess, for the counters
            if req_id in guesses and fed[req_id]:
                out.guessed_token_ids[req_id] = (first[req_id].start_pos, guesses[req_id])
        dropped: set[str] = set()  # filled by settle_guesses before finish() runs
        self._launched = (out.guessed_token_ids, dropped, [r for r in spec if fed[r]])
        deferred, num_values = self._deferred, readback.shape[0]
        ahead: list = []  # the draft_ahead round's _Ahead, once queued (after this step's readback)
        if deferred is not None:  # the drafts come back behind the step's own values
            readback = torch.cat([readback, deferred.tokens])
            self.num_deferred_verifies += 1
            items, at = [], []
            ahead_ok = len(spec) <= AHEAD_MAX_REQUESTS and (AHEAD_ON_CPU or self.runner.device.type != "cpu")
            for req_id in spec if ahead_ok else ():
                s, n = first[req_id], len(fed[req_id])
                pos = int(step.positions[rows[req_id][n]]) if n else -1  # its last draft's
                if n and self._ahead_fits(s, pos, n):
                    items.append((s, pos))
                    at += [num_values + deferred.offsets[req_id] + n - 1, spans[req_id] + n]
            if items:
                self._ahead = (items, readback.index_select(0, to_device(at, torch.int64, readback.device)), ahead)

        index, void = self.sampled_index, self._void  # this step's (prepare() replaces them)

        def finish(values: list[int]) -> None:
            if deferred is not None:  # the drafts' values, where their placeholders stood
                drafted = deferred.settle(values[num_values:])
                values = values[:num_values]
                for r, req_id in zip(draft_rows, spec):
                    r.draft_token_ids = drafted[req_id][:r.num_rows]
                    fed[req_id][:] = r.draft_token_ids[:r.num_rows - 1]
                self._propose_seconds += deferred.timer.seconds()  # (its rounds ran before this step)
                self._add_ahead_times()
                if ahead:  # queued behind this step's readback: read once done
                    self._ahead_timers.append(ahead[0].timer)
            out.sampled_token_ids.update((req_id, values[i]) for req_id, i in zip(plain, plain_at))
            for req_id in bridged:
                if req_id in index:
                    out.sampled_token_ids[req_id] = values[index[req_id]]
                elif req_id in void:
                    out.void_req_ids.add(req_id)
            for req_id, tokens in zip(spec, finish_spec(values[:num_spec_values])):
                if req_id in dropped:  # its row 0's token only (= tokens[0], accepted or not: one-hot drafts)
                    out.sampled_token_ids[req_id] = tokens[0]
                    continue
                out.sampled_token_ids[req_id] = tokens[-1]
                if fed[req_id]:
                    out.spec_token_ids[req_id] = fed[req_id]
                    out.num_accepted_tokens[req_id] = len(tokens) - 1
                    self._after_round(req_id, len(fed[req_id]), len(tokens) - 1)
                if ahead and req_id in ahead[0].index:
                    self.draft.settle_ahead(ahead[0], req_id, len(tokens) - 1 == len(fed[req_id]))
        return readback, finish

    def _when_verified(self, verifying, bridged: list[str], spans: dict[str, int], rows: dict[str, int]) -> None:
        """Once the verify step in flight (`verifying`, a PendingOutput) has its result (settled
        by bridge_void(), on the engine thread right after that result is applied): each bridged
        request's token is its row `accepted` of this step (its index in this step's readback,
        for the next step's input and for finish()), or none when it accepted more drafts than
        this step had rows for it (`_void`)."""
        index, void = self.sampled_index, self._void

        def settle() -> None:
            try:
                src = verifying.result()  # applied already: returns at once
            except Exception:  # that step failed (its requests with it): nothing comes from here
                void.update(bridged)
                return
            for req_id in bridged:
                accepted = src.num_accepted_tokens.get(req_id, 0)
                if accepted < rows[req_id]:
                    index[req_id] = spans[req_id] + accepted
                else:
                    void.add(req_id)
                    self.num_bridge_void += 1
        self._settle = settle
