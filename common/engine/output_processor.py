"""OutputProcessor: engine Requests -> public RequestOutputs (detokenized, stop strings applied).

A user request with n > 1 is n engine Requests ("id#0", "id#1", ...); this is where they are
gathered back into one RequestOutput with n CompletionOutputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.common.detokenizer import IncrementalDetokenizer
from pdserve.common.engine_client import TokenizerLike
from pdserve.common.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pdserve.common.request import Request, RequestStatus
from pdserve.common.sampling_params import SamplingParams


@dataclass
class ParentRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    children: list[Request] = field(default_factory=list)
    detokenizers: list[IncrementalDetokenizer] = field(default_factory=list)
    logprobs: list[list] = field(default_factory=list)  # per child: public Logprob dicts so far
    prompt_logprobs: list = field(default_factory=list)
    error: str | None = None

    def finished(self) -> bool:
        return all(c.is_finished() for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer: TokenizerLike | None):
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentRequest] = {}
        self.child_to_parent: dict[str, ParentRequest] = {}

    def add(self, parent: ParentRequest) -> None:
        self.parents[parent.request_id] = parent
        parent.logprobs = [[] for _ in parent.children]
        for child in parent.children:
            self.child_to_parent[child.request_id] = parent
            p = child.params
            parent.detokenizers.append(IncrementalDetokenizer(
                self.tokenizer, child.prompt_token_ids, p.stop, p.include_stop_str_in_output,
                p.skip_special_tokens) if self.tokenizer is not None else None)

    def process(self, touched: list[Request], finish) -> list[RequestOutput]:
        """Detokenize the touched requests' new tokens; `finish(ids, status)` ends those whose text
        hit a stop string. Returns one output per parent that changed."""
        changed: dict[str, ParentRequest] = {}
        for req in touched:
            parent = self.child_to_parent.get(req.request_id)
            if parent is None:
                continue
            detok = parent.detokenizers[parent.children.index(req)]
            if detok is not None:
                new = req.output_token_ids[detok.num_output_tokens:]
                if new and _ended_by_stop_token(req):
                    new = new[:-1]  # the stop token / EOS itself is not part of the text
                    detok.num_output_tokens += 1
                stop = detok.add_tokens(new) if new else None
                if stop is not None and not req.is_finished():
                    req.stop_reason = stop
                    finish([req.request_id], RequestStatus.FINISHED_STOPPED)
            changed[parent.request_id] = parent
        return [self._output(p) for p in changed.values()]

    def fail(self, request_ids: list[str], message: str) -> list[RequestOutput]:
        outs = {}
        for rid in request_ids:
            parent = self.child_to_parent.get(rid)
            if parent is not None:
                parent.error = message
                outs[parent.request_id] = parent
        return [self._output(p) for p in outs.values()]

    def _output(self, parent: ParentRequest) -> RequestOutput:
        completions = []
        for i, (req, detok) in enumerate(zip(parent.children, parent.detokenizers)):
            finished = req.is_finished()
            text = detok.visible_text(finished) if detok is not None else ""
            logprobs = None
            if req.params.logprobs is not None:
                # converted once per token and kept: each step only converts the new entries
                done = parent.logprobs[i]
                done += [self._logprob_dict(top) for _, top in req.logprobs[len(done):]]
                logprobs = list(done)
            completions.append(CompletionOutput(
                index=i, text=text, token_ids=list(req.output_token_ids),
                cumulative_logprob=req.cumulative_logprob if req.params.logprobs is not None else None,
                logprobs=logprobs, finish_reason=req.finish_reason() if finished else None,
                stop_reason=req.stop_reason if finished else None))
        first = parent.children[0]
        metrics = RequestMetrics(arrival_time=parent.arrival_time, first_scheduled_time=first.first_scheduled_time,
                                 first_token_time=first.first_token_time,
                                 num_cached_prompt_tokens=first.num_cached_tokens or 0,
                                 num_computed_prompt_tokens=first.num_computed_prompt_tokens)
        prompt_lps = None
        if parent.params.prompt_logprobs is not None:
            done = parent.prompt_logprobs
            done += [None if e is None else self._logprob_dict(e) for e in first.prompt_logprobs[len(done):]]
            prompt_lps = list(done)
        finished = parent.finished()
        if finished:
            self._drop(parent)
        return RequestOutput(request_id=parent.request_id, prompt=parent.prompt,
                             prompt_token_ids=parent.prompt_token_ids, outputs=completions, finished=finished,
                             prompt_logprobs=prompt_lps, metrics=metrics,
                             num_cached_tokens=first.num_cached_tokens or 0, error=parent.error)

    def _logprob_dict(self, top: dict[int, tuple[float, int]]) -> dict[int, Logprob]:
        decode = (lambda t: self.tokenizer.decode([t], skip_special_tokens=False)) if self.tokenizer else (lambda t: None)
        return {t: Logprob(lp, rank, decode(t)) for t, (lp, rank) in top.items()}

    def _drop(self, parent: ParentRequest) -> None:
        self.parents.pop(parent.request_id, None)
        for child in parent.children:
            self.child_to_parent.pop(child.request_id, None)


def _ended_by_stop_token(req: Request) -> bool:
    return (req.status == RequestStatus.FINISHED_STOPPED and not isinstance(req.stop_reason, str)
            and not req.params.include_stop_str_in_output)
