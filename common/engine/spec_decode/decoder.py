"""SpecDecoder: the model runner's hook for speculative decoding (see __init__.py for the step).

    launch(sched):  scheduled = prepare(sched)     # drafts appended: inputs [t, d1 .. dn]
                    hidden = target forward        # a speculating request is a small chunk
                    verify(hidden, step, ...)      # logits at its n + 1 last rows -> tokens

Requests with and without drafts share the batch: `verify` samples the others with the
runner's own sampler, on their last row as usual. A verify step runs eagerly on CUDA (its
chunks are not decode-only steps, which are what the CUDA graphs capture); the draft model's
one-token steps replay its own graphs.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from pdserve.common.config import SpeculativeConfig
from pdserve.common.engine.model_runner import position_seed
from pdserve.common.engine.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput
from pdserve.common.engine.spec_decode import speculates
from pdserve.common.engine.spec_decode.rejection import DraftRows, verify
from pdserve.common.models.attention import StepInputs


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, runner):
        """Before the target's KV pool exists: a draft model's shape is read (for the pool's
        size), its weights are loaded in `start`."""
        self.config = config
        self.runner = runner
        if config.method == "ngram":
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
        self.propose_seconds = 0.0  # host time in proposers (bench spec: the draft's cost)

    def draft_bytes_per_block(self, block_size: int) -> int:
        return 0 if self.draft is None else self.draft.draft_bytes_per_block(block_size)

    def reserved_bytes(self) -> int:
        """GPU memory outside the KV pool that the draft needs (its weights)."""
        return 0 if self.draft is None else self.draft.weight_bytes()

    def start(self) -> None:
        if self.draft is not None:
            self.draft.start(self.runner.num_blocks, self.runner.block_size)

    def prepare(self, sched: SchedulerOutput) -> list[ScheduledRequest]:
        """The step's requests, those with draft slots carrying up to num_spec_slots drafts."""
        self.proposer.forget(sched.finished_req_ids | sched.preempted_req_ids)
        # A draft model at temperature > 0 also drafts the token after the fed drafts, even with
        # no slot to feed any (draft_model.py: every position is then decided the same way).
        want = [s for s in sched.scheduled if s.num_spec_slots or (
            self.draft is not None and s.sample and s.params.temperature != 0
            and speculates(s.params, len(s.output_token_ids)))]
        self._drafts, self._probs = {}, {}
        if not want:
            return sched.scheduled
        t0 = time.perf_counter()
        for req_id, (drafts, probs) in self.proposer.propose(want).items():
            self._drafts[req_id], self._probs[req_id] = drafts, probs
        self.propose_seconds += time.perf_counter() - t0
        out = []
        for s in sched.scheduled:
            drafts = self._drafts.get(s.req_id)
            if drafts:
                fed = drafts[:s.num_spec_slots]
                s = dataclasses.replace(s, input_token_ids=s.input_token_ids + fed, spec_token_ids=fed)
            out.append(s)
        return out

    def has_drafts(self) -> bool:
        """The step being launched carries drafts: `verify` decides its tokens."""
        return bool(self._drafts)

    def verify(self, hidden: torch.Tensor, step: StepInputs, ordered: list[ScheduledRequest],
               out: RunnerOutput) -> None:
        """Tokens of every sampling request of a step with drafts into `out` (on the host)."""
        runner = self.runner
        ends = step.query_start_loc[1:]
        rows, spans, sample_reqs = [], [], []
        for s, end in zip(ordered, ends.tolist()):
            if s.sample:
                m = 1 + len(s.spec_token_ids)
                spans.append(len(rows))
                rows.extend(range(end - m, end))
                sample_reqs.append(s)
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(hidden.device)
        logits = runner.model.compute_logits(hidden.index_select(0, index))  # [R, V]
        plain = [i for i, s in enumerate(sample_reqs) if s.req_id not in self._drafts]
        if plain:
            reqs = [sample_reqs[i] for i in plain]
            rows_plain = logits.index_select(0, torch.tensor([spans[i] for i in plain], device=logits.device))
            tokens = runner.sampler.sample(rows_plain, reqs, runner.arch.eos_token_ids,
                                           [runner.generator(s) for s in reqs])
            out.logprobs = runner.sampler.logprobs(rows_plain, tokens, reqs)
            out.sampled_token_ids.update(zip((s.req_id for s in reqs), tokens.tolist()))
        spec = [i for i, s in enumerate(sample_reqs) if s.req_id in self._drafts]
        rows_spec = []
        for i in spec:
            s = sample_reqs[i]
            n = len(s.spec_token_ids)
            drafts = self._drafts[s.req_id][:n + 1]
            probs = self._probs[s.req_id]
            rows_spec.append(DraftRows(first_row=spans[i], num_rows=n + 1, draft_token_ids=drafts,
                                       draft_probs=probs, params=s.params,
                                       first_position=s.start_pos + s.num_tokens - n))
        accepted = verify(logits, rows_spec, runner.sampler.shared_generator, position_seed)
        for s, tokens in zip((sample_reqs[i] for i in spec), accepted):
            out.sampled_token_ids[s.req_id] = tokens[-1]
            if s.spec_token_ids:
                out.spec_token_ids[s.req_id] = s.spec_token_ids
                out.num_accepted_tokens[s.req_id] = len(tokens) - 1
