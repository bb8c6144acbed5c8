"""Scheduler: continuous batching under a token budget, with chunked prefill and preemption.

There is no prefill/decode mode: every request simply has `num_tokens - num_computed_tokens`
tokens left to run (a whole prompt, a chunk of one, or the one token sampled last step), and each
step hands out at most `max_num_batched_tokens` of them over at most `max_num_seqs` requests.

    schedule():  running requests first (oldest first); when blocks run out, preempt the newest
                 running request (drop its KV, recompute later) until the older one fits;
                 then admit waiting requests (prefix hits first, then chunk to the budget).
    update():    advance num_computed_tokens, append sampled tokens, apply token-level stops.

State changes only in `add_request`, `schedule`, `update` and `finish_requests`.
"""

from __future__ import annotations

import time
from collections import deque

from pdserve.common.config import SchedulerConfig
from pdserve.common.engine.kv_cache_manager import KVCacheManager
from pdserve.common.engine.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput
from pdserve.common.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager):
        self.config = config
        self.kv = kv_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()
        self.num_preemptions = 0

    # ---- admission -------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_running(self) -> int:
        return len(self.running)

    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- schedule --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: set[str] = set()
        now = time.time()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()  # newest first
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append(self._scheduled(req, num_new))
                budget -= num_new
                i += 1

        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                computed = self.kv.get_computed_blocks(req) if req.num_computed_tokens == 0 else []
                num_left = req.num_tokens - req.num_computed_tokens - len(computed) * self.kv.block_size
                num_new = num_left
                if num_new > budget:
                    if not self.config.enable_chunked_prefill:
                        break
                    num_new = budget
                if not self.kv.allocate_slots(req, num_new, computed):
                    break
                self.waiting.popleft()
                if req.num_cached_tokens is None:
                    req.num_cached_tokens = min(len(computed) * self.kv.block_size, req.num_prompt_tokens)
                req.status = RequestStatus.RUNNING
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                self.running.append(req)
                scheduled.append(self._scheduled(req, num_new))
                budget -= num_new

        finished, self._finished_ids = self._finished_ids, set()
        return SchedulerOutput(scheduled=scheduled,
                               num_batched_tokens=self.config.max_num_batched_tokens - budget,
                               finished_req_ids=finished, preempted_req_ids=preempted)

    def _scheduled(self, req: Request, num_new: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        end = start + num_new
        return ScheduledRequest(
            req_id=req.request_id, input_token_ids=req.all_token_ids[start:end], start_pos=start,
            block_ids=req.block_ids, sample=end == req.num_tokens, params=req.params,
            prompt_token_ids=req.prompt_token_ids, output_token_ids=req.output_token_ids)

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
        for s in sched.scheduled:
            req = self.requests.get(s.req_id)
            if req is None or req.is_finished():
                continue
            prompt_end = min(s.start_pos + s.num_tokens, req.num_prompt_tokens)
            req.num_computed_prompt_tokens += max(prompt_end - s.start_pos, 0)
            req.num_computed_tokens += s.num_tokens
            if s.req_id in result.prompt_logprobs and req.num_preemptions == 0:
                req.prompt_logprobs.extend(result.prompt_logprobs[s.req_id])
            token = result.sampled_token_ids.get(s.req_id)
            if token is None:
                continue
            req.append_output_token(token)
            if s.req_id in result.logprobs:
                chosen, top = result.logprobs[s.req_id]
                req.logprobs.append((chosen, top))
                req.cumulative_logprob += chosen
            if req.first_token_time is None:
                req.first_token_time = now
            status = self._check_stop(req, token)
            if status is not None:
                self.finish_requests([req.request_id], status)
            touched.append(req)
        return touched

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        p = req.params
        if req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        if req.num_output_tokens < p.min_tokens:
            return None
        if not p.ignore_eos and token in req.eos_token_ids:
            req.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if token in p.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if p.max_tokens is not None and req.num_output_tokens >= p.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- finishing -------------------------------------------------------------------------
    def finish_requests(self, req_ids, status: RequestStatus) -> list[Request]:
        """Finish (stop string, abort, error) or complete requests, freeing their blocks."""
        done = []
        for req_id in req_ids:
            req = self.requests.pop(req_id, None)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            req.status = status
            if req.kv_lease is not None and status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
                lease_id, expires_at = req.kv_lease
                req.lease_block_ids = self.kv.lease(req, lease_id, req.num_prompt_tokens, expires_at)
            self.kv.free(req)
            self._finished_ids.add(req_id)
            done.append(req)
        return done
