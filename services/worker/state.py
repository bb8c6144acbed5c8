"""Who a worker is and what it reports: id, role and status (following its registry record),
its gRPC Health answer, and the one check of an incoming Prefill/Decode request."""

from __future__ import annotations

import asyncio
import logging
import os

import grpc

from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.common.sampling_params import ParameterError, SamplingParams
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import ROLES, STATUSES, sampling_params_from_proto

log = logging.getLogger("pdserve.worker")


def model_id(engine: AsyncLLM) -> str:
    """Identity of the weights, equal across a fleet serving the same model."""
    return os.path.basename(os.path.normpath(engine.core.model_path))


class WorkerState:
    """Who this worker is told to be: id, role and status, following its registry record."""

    def __init__(self, engine: AsyncLLM, instance_id: str, role: str):
        self.engine = engine
        self.instance_id = instance_id
        self._role = role
        self.heartbeater = None  # set by follow(); without Redis the role is fixed
        self.shutting_down = False  # SIGTERM or a dead engine: Health says NOT_SERVING until the process exits

    def follow(self, heartbeater) -> None:
        self.heartbeater = heartbeater

    @property
    def role(self) -> str:
        return self.heartbeater.info.role if self.heartbeater else self._role

    @property
    def status(self) -> str:
        if self.shutting_down or self.engine.dead is not None:
            return "not_serving"
        return self.heartbeater.info.status if self.heartbeater else "serving"

    def health(self) -> pb.HealthResponse:
        core = self.engine.core
        s = core.stats()
        load = pb.Load(num_running=s.num_running, num_waiting=s.num_waiting, kv_usage=s.kv_usage,
                       num_free_blocks=s.num_free_blocks, num_total_blocks=s.num_blocks)
        return pb.HealthResponse(instance_id=self.instance_id, role=ROLES[self.role], model=model_id(self.engine),
                                 block_size=core.kv.block_size, load=load, status=STATUSES[self.status],
                                 max_model_len=core.max_model_len)

    async def watch(self, interval_s: float = 0.5) -> None:
        """Log the operator's changes as the Heartbeater brings them, and when a drain is complete."""
        seen = (self.role, self.status)
        drained_logged = False
        while True:
            await asyncio.sleep(interval_s)
            now = (self.role, self.status)
            if now != seen:
                log.warning("%s: registry says role=%s status=%s (was role=%s status=%s)",
                            self.instance_id, *now, *seen)
                seen, drained_logged = now, False
            s = self.engine.core.stats()
            if now[1] == "draining" and not drained_logged and s.num_running + s.num_waiting == 0:
                log.warning("%s: drained (no request running or waiting)", self.instance_id)
                drained_logged = True

    async def checked_request(self, request, context) -> tuple[SamplingParams, list[int]]:
        """(params, prompt ids) of a Prefill/Decode request, or INVALID_ARGUMENT naming the bad field.
        The router validated it; this is the worker's guard against other callers."""
        try:
            return self.checked(request)
        except ParameterError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e.param}: {e}")

    def checked(self, request) -> tuple[SamplingParams, list[int]]:
        """(params, prompt ids) of a Prefill/Decode request; ParameterError naming the bad field."""
        params = sampling_params_from_proto(request.params)
        prompt = list(request.prompt_token_ids)
        self.engine.core.validate(prompt, params)
        return params, prompt
