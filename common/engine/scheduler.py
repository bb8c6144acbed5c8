"""Scheduler: continuous batching under a token budget, with chunked prefill and preemption.

There is no prefill/decode mode: every request simply has `num_tokens - num_computed_tokens`
tokens left to run (a whole prompt, a chunk of one, or the one token sampled last step), and each
step hands out at most `max_num_batched_tokens` of them over at most `max_num_seqs` requests.

    schedule():  running requests first (oldest first); when blocks run out, preempt the newest
                 running request (drop its KV, recompute later) until the older one fits;
                 then admit waiting requests (prefix hits first, then chunk to the budget).
                 Scheduled tokens count as computed from here on (num_computed_tokens).
    update():    append sampled tokens, apply token-level stops.

Overlapped steps: the engine may call schedule() for step k while step k-1 is still running on
the device (update(k-1) comes after). A request sampling in k-1 has `num_inflight = 1`: its
next input is PLACEHOLDER_TOKEN, which the runner fills on the device; a request whose in-flight
token certainly ends it (max_tokens, max_model_len) is not scheduled again. One whose token
turns out to be EOS or a stop runs one extra step whose token update() drops.

Speculative decoding (spec_decode/): a decoding request also gets KV slots (and budget) for up
to k drafts past its known tokens and the one in flight, if any (`num_spec_slots`); update()
appends the accepted drafts and the token after them, counts only their KV as computed and,
once no step of the request is in flight, frees blocks left holding only rejected drafts.

KV connector (disaggregated serving, kv_connector.py): a waiting request whose KV the connector
loads from elsewhere is reserved its blocks and parked as WAITING_FOR_KV until the connector
reports the load; a finishing request may have its prompt's blocks leased to a consumer.

State changes only in `add_request`, `schedule`, `update` and `finish_requests`.
"""

from __future__ import annotations

import time
from collections import deque

from pdserve.common.config import SchedulerConfig
from pdserve.common.engine.kv_cache_manager import KVCacheManager
from pdserve.common.engine.kv_connector import KVConnector
from pdserve.common.engine.outputs import PLACEHOLDER_TOKEN, RunnerOutput, ScheduledRequest, SchedulerOutput
from pdserve.common.engine.spec_decode import max_draft_tokens
from pdserve.common.request import Request, RequestStatus

# Module constants: an enum's class attribute lookup is slow, and these are read per request per step.
FINISHED_LENGTH, FINISHED_STOPPED = RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED
_LAST_UNFINISHED = RequestStatus.PREEMPTED  # status > this: finished (RequestStatus.is_finished)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, connector: KVConnector | None = None,
                 num_speculative_tokens: int = 0):
        self.config = config
        self.num_speculative_tokens = num_speculative_tokens
        self.rounds_per_step = 0  # a lone request's verify rounds chained on the device (the runner's)
        self.kv = kv_manager
        self.connector = connector
        self.waiting: deque[Request] = deque()
        self.loading: dict[str, Request] = {}  # WAITING_FOR_KV (or finished while loading)
        self._loading_parents: set[str] = set()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()
        self.num_preemptions = 0
        self.num_decode_defers = 0  # steps in a row that left running requests' decodes out
        self.num_deferred_steps = 0  # such steps in all
        self.num_host_history_requests = 0  # requests whose sampling needs the latest tokens on the host

    # ---- admission -------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)
        self.num_host_history_requests += req.params.needs_host_history

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def has_schedulable(self) -> bool:
        """Work a step can do now (requests whose KV is still loading cannot run yet)."""
        return bool(self.waiting or self.running)

    def num_running(self) -> int:
        return len(self.running)

    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- schedule --------------------------------------------------------------------------
    def schedule(self, may_defer: bool = True, preempted: set[str] | None = None) -> SchedulerOutput:
        """The next step. `may_defer`, `preempted`: the call again without deferred decodes,
        when deferring them left a step with nothing to run (see `decode_defer_steps`)."""
        budget = self.config.token_budget
        scheduled: list[ScheduledRequest] = []
        preempted = set() if preempted is None else preempted
        now = time.time()
        if self.connector is not None:
            self._admit_loaded()
        # prompts waiting: the running requests' decodes may wait too, giving the prompts the step
        # (config.py: decode_defer_steps); never with a KV connector (its loads start in admission),
        # nor while max_num_seqs requests run (no prompt could be admitted: the step would be empty
        # and scheduled again without deferring)
        defer = (may_defer and self.waiting and self.connector is None
                 and len(self.running) < self.config.max_num_seqs
                 and self.num_decode_defers < self.config.decode_defer_limit)
        deferred: list[Request] = []

        i = 0
        running, max_model_len = self.running, self.config.max_model_len
        while i < len(running) and budget > 0:
            req = running[i]
            num_ahead = len(req.all_token_ids) + req.num_inflight  # known tokens + the one in flight
            num_new = min(num_ahead - req.num_computed_tokens, budget)
            if num_new <= 0 or req.num_inflight and req.finishes_with_inflight(max_model_len):
                i += 1  # its step in flight ends it (update() finishes it)
                continue
            if defer and num_new == 1 and req.num_computed_tokens >= req.num_prompt_tokens:
                deferred.append(req)  # a decode: after the prompts, in what budget they leave
                i += 1
                continue
            reaches_end = req.num_computed_tokens + num_new == num_ahead
            while (num_spec := self._allocate(req, num_new, budget, reaches_end)) is None:
                victim = self.running.pop()  # newest first
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append(self._scheduled(req, num_new, num_spec))
                budget -= num_new + num_spec
                i += 1

        if not preempted:
            behind_loads = []  # siblings of a request whose KV is loading: they will hit it in the cache
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                if req.num_inflight:  # preempted while its token was in flight: after update()
                    break
                if self.connector is not None:
                    if req.parent_id in self._loading_parents:
                        behind_loads.append(self.waiting.popleft())
                        continue
                    if req.num_external_tokens is None and self._start_load(req):
                        continue
                computed = self.kv.get_computed_blocks(req) if req.num_computed_tokens == 0 else []
                num_left = req.num_tokens - req.num_computed_tokens - len(computed) * self.kv.block_size
                num_new = num_left
                if num_new > budget:
                    if not self.config.enable_chunked_prefill:
                        break
                    num_new = budget
                num_spec = self._allocate(req, num_new, budget, num_new == num_left, computed)
                if num_spec is None:
                    break
                self.waiting.popleft()
                if req.num_cached_tokens is None:  # its first admission (not a preempted one's return)
                    req.num_cached_tokens = min(len(computed) * self.kv.block_size, req.num_prompt_tokens)
                    self.kv.count_prefix_lookup(req, len(computed))
                req.status = RequestStatus.RUNNING
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                self.running.append(req)
                scheduled.append(self._scheduled(req, num_new, num_spec))
                budget -= num_new + num_spec
            self.waiting.extendleft(reversed(behind_loads))

        if deferred:
            if not scheduled:  # nothing else could run: the decodes run now, as without deferring
                return self.schedule(may_defer=False, preempted=preempted)
            budget = self._schedule_deferred(deferred, budget, scheduled)
        self.num_decode_defers = self.num_decode_defers + 1 if deferred else 0
        self.num_deferred_steps += bool(deferred)

        finished, self._finished_ids = self._finished_ids, set()
        return SchedulerOutput(scheduled=scheduled,
                               num_batched_tokens=self.config.token_budget - budget,
                               finished_req_ids=finished, preempted_req_ids=preempted,
                               any_host_history=self.num_host_history_requests > 0)

    def _schedule_deferred(self, deferred: list[Request], budget: int, scheduled: list[ScheduledRequest]) -> int:
        """Deferred decodes into the budget the prompts left (the step that admits the last waiting
        prompt), oldest first, only where their KV fits without preempting. Returns the budget left;
        `deferred` keeps the decodes still waiting."""
        rest = []
        for req in deferred:
            num_spec = self._allocate(req, 1, budget, True) if budget > 0 else None
            if num_spec is None:
                rest.append(req)
                continue
            scheduled.append(self._scheduled(req, 1, num_spec))
            budget -= 1 + num_spec
        deferred[:] = rest
        return budget

    def _allocate(self, req: Request, num_new: int, budget: int, reaches_end: bool, computed=()) -> int | None:
        """Reserve KV slots for num_new tokens, and for drafts when the chunk reaches the end of the
        known tokens and the request speculates (without drafts if the pool is short for them).
        Returns the draft slots reserved, or None when not even num_new fit."""
        if not self.num_speculative_tokens:
            return 0 if self.kv.allocate_slots(req, num_new, computed) else None
        num_spec = 0
        if reaches_end:
            k = self.num_speculative_tokens
            if self.rounds_per_step and num_new == 1 and self._alone(req):  # spec_decode/device_rounds.py
                k = self.rounds_per_step * (k + 1) - 1
            num_spec = min(max_draft_tokens(req, k, self.config.max_model_len), budget - num_new)
        if num_spec > 0 and self.kv.allocate_slots(req, num_new + num_spec, computed):
            return num_spec
        return 0 if self.kv.allocate_slots(req, num_new, computed) else None

    def _alone(self, req: Request) -> bool:
        """req's decode may chain verify rounds on the device: nothing else runs, waits or loads,
        no step of it is in flight, and its tokens are plain argmaxes (the rounds' only sampler)."""
        p = req.params
        return (len(self.running) == 1 and not self.waiting and not self.loading and not req.num_inflight
                and p.temperature == 0 and not p.logit_bias)

    def _scheduled(self, req: Request, num_new: int, num_spec: int = 0) -> ScheduledRequest:
        start = req.num_computed_tokens
        end = start + num_new
        known = len(req.all_token_ids)
        if end > known:  # the token in flight is this step's input
            tokens = req.all_token_ids[start:end] + [PLACEHOLDER_TOKEN] * (end - max(start, known))
        else:
            tokens = req.all_token_ids[start:end]
        sample = end == known + req.num_inflight
        req.num_computed_tokens = end
        req.num_inflight += sample
        # positional: ScheduledRequest's field order (once per request per step)
        return ScheduledRequest(req.request_id, tokens, start, req.block_ids, sample, req.params,
                                req.prompt_token_ids, req.output_token_ids, num_spec)

    # ---- KV loads (connector) ---------------------------------------------------------------
    def _start_load(self, req: Request) -> bool:
        """Park `req` while the connector loads its prompt's KV; False: it is computed here."""
        num_external = req.num_external_tokens = self.connector.num_external_tokens(req)
        if num_external <= 0:  # asked once: a failed or skipped load is recomputed here
            return False
        block_ids, num_hits = self.kv.reserve_for_pull(req, num_external)
        if num_hits < 0:  # the pool is short: compute the prompt here when blocks free up
            req.num_external_tokens = 0
            self.connector.skip_load(req)
            return False
        self.waiting.popleft()
        req.status = RequestStatus.WAITING_FOR_KV
        self.loading[req.request_id] = req
        self._loading_parents.add(req.parent_id)
        self.connector.start_load(req, block_ids, num_hits)
        return True

    def _admit_loaded(self) -> None:
        for req_id, ok in self.connector.finished_loads():
            req = self.loading.pop(req_id, None)
            if req is None:
                continue
            self._loading_parents.discard(req.parent_id)
            if req.is_finished():  # finished while loading: its blocks were kept until now
                self.kv.free(req)
                continue
            if ok:
                self.kv.commit_pulled(req, req.num_external_tokens)
                req.num_cached_tokens = req.num_external_tokens
            else:
                self.kv.free(req)
                req.num_external_tokens = 0
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- update ----------------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Apply one step's results; returns requests that got a new token or finished."""
        now = time.time()
        touched = []
        requests, sampled, spec_tokens = self.requests, result.sampled_token_ids, result.spec_token_ids
        prompt_logprobs, logprobs = result.prompt_logprobs, result.logprobs
        one_token = not logprobs and not self.num_speculative_tokens  # a sampled token is all there is
        for s in sched.scheduled:
            req = requests.get(s.req_id)
            if req is None or req.status > _LAST_UNFINISHED:  # is_finished(), inlined: once per request
                continue
            num_prompt = len(req.prompt_token_ids)
            if s.start_pos < num_prompt:
                req.num_computed_prompt_tokens += min(s.start_pos + len(s.input_token_ids), num_prompt) - s.start_pos
            if prompt_logprobs and s.req_id in prompt_logprobs:
                # the chunk's entries are for prompt tokens `first` .. (token 0's is None); a request
                # preempted and recomputed from 0 has the first ones already: only the new ones go on
                first, have = (0 if s.start_pos == 0 else s.start_pos + 1), len(req.prompt_logprobs)
                if first <= have:
                    req.prompt_logprobs.extend(prompt_logprobs[s.req_id][have - first:])
            token = sampled.get(s.req_id)
            if token is None:
                if s.req_id in result.void_req_ids:  # a bridge step without its row (spec_decode/pipeline.py)
                    req.num_inflight -= 1  # (preempted meanwhile: 0 computed already)
                    req.num_computed_tokens = max(req.num_computed_tokens - 1, 0)
                continue
            req.num_inflight -= 1
            if one_token:  # the usual decode step: append, check the stops
                req.output_token_ids.append(token)
                req.all_token_ids.append(token)
                status = self._check_stop(req, token)
                if status is not None:
                    self.finish_requests([req.request_id], status)
                if req.first_token_time is None:
                    req.first_token_time = now
                touched.append(req)
                continue
            drafts = spec_tokens.get(s.req_id)
            new_tokens = [token]
            if drafts:  # the accepted drafts' KV is valid; the rest of the reserved slots are not
                # (a bridge step may run: its token's position follows from num_accepted, pipeline.py)
                assert req.num_inflight <= 1, "two steps were launched after the verify step they follow"
                num_accepted = result.num_accepted_tokens[s.req_id]
                new_tokens = drafts[:num_accepted] + new_tokens
                req.num_computed_tokens += num_accepted
            for token in new_tokens:
                req.append_output_token(token)
                if s.req_id in logprobs:
                    chosen, top = logprobs[s.req_id]
                    req.logprobs.append((chosen, top))
                    req.cumulative_logprob += chosen
                status = self._check_stop(req, token)
                if status is not None:
                    self.finish_requests([req.request_id], status)
                    break
            else:  # blocks past the known tokens held only draft slots, unless a step in flight uses them
                if self.num_speculative_tokens and not req.num_inflight:
                    self.kv.free_tail(req, req.num_tokens)
            if req.first_token_time is None:
                req.first_token_time = now
            touched.append(req)
        return touched

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        p = req.params
        if len(req.all_token_ids) >= self.config.max_model_len:
            return FINISHED_LENGTH
        num_output = len(req.output_token_ids)
        if num_output < p.min_tokens:
            return None
        if not p.ignore_eos and token in req.eos_token_ids:
            req.stop_reason = None
            return FINISHED_STOPPED
        if p.stop_token_ids and token in p.stop_token_ids:
            req.stop_reason = token
            return FINISHED_STOPPED
        if p.max_tokens is not None and num_output >= p.max_tokens:
            return FINISHED_LENGTH
        return None

    # ---- finishing -------------------------------------------------------------------------
    def finish_requests(self, req_ids, status: RequestStatus) -> list[Request]:
        """Finish (stop string, abort, error) or complete requests, freeing their blocks."""
        done = []
        for req_id in req_ids:
            req = self.requests.pop(req_id, None)
            if req is None:
                continue
            self.num_host_history_requests -= req.params.needs_host_history
            loading = req.status == RequestStatus.WAITING_FOR_KV
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            req.status = status
            if loading:  # the load may still write into its blocks: freed when it reports back
                self.connector.cancel_load(req)
            else:
                if self.connector is not None and status in (RequestStatus.FINISHED_STOPPED,
                                                             RequestStatus.FINISHED_LENGTH):
                    lease = self.connector.request_finished(req)
                    if lease is not None:
                        lease_id, expires_at = lease
                        self.kv.lease(req, lease_id, req.num_prompt_tokens, expires_at)
                self.kv.free(req)
            self._finished_ids.add(req_id)
            done.append(req)
        return done
