"""The front end's half of the one output path: EngineOutputs -> RequestOutputs (torch-free).

    EngineOutput deltas (one per sequence per step, from the in-process engine, or from prefill
    and decode workers through the router)
        --> RequestState.add: append ids and logprobs; detokenize the new ids once; match stop
            strings once (a match finishes the sequence here and tells the caller to stop it in
            the engine); fill each logprob's decoded token
        --> RequestState.output(): the cumulative RequestOutput of all n sequences

Each user request has one RequestState, owned by whoever talks to the client: `LLM` (offline),
`AsyncLLM.generate` (`pdserve serve`) or `DisaggClient.generate` (`pdserve router`). Nothing else
detokenizes or matches stop strings, so every deployment produces the same text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.common.detokenizer import IncrementalDetokenizer
from pdserve.common.engine_client import TokenizerLike
from pdserve.common.outputs import CompletionOutput, EngineOutput, Logprob, RequestMetrics, RequestOutput, TokenLogprobs
from pdserve.common.sampling_params import SamplingParams


@dataclass
class _Sequence:
    detok: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestState:
    def __init__(self, tokenizer: TokenizerLike | None, request_id: str, prompt: str | None,
                 prompt_token_ids: list[int], params: SamplingParams, arrival_time: float | None = None):
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time())
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None
        self.error: str | None = None
        self.seqs = [_Sequence(IncrementalDetokenizer(
            tokenizer, prompt_token_ids, params.stop, params.include_stop_str_in_output,
            params.skip_special_tokens, params.min_tokens) if tokenizer is not None else None) for _ in range(params.n)]

    @property
    def finished(self) -> bool:
        return self.error is not None or all(s.finish_reason is not None for s in self.seqs)

    def add(self, out: EngineOutput) -> bool:
        """Apply one delta. True when a stop string ended the sequence here: the caller stops it
        in the engine (which does not know the text)."""
        seq = self.seqs[out.index]
        if seq.finish_reason is not None:
            return False  # a stopped sequence's tokens still in flight
        self._metrics(out)
        if out.error is not None:
            self.error = out.error
        new_ids = out.new_token_ids
        text_ids = new_ids
        if (out.finish_reason == "stop" and not isinstance(out.stop_reason, str) and text_ids
                and not self.params.include_stop_str_in_output):
            text_ids = text_ids[:-1]  # the stop token or EOS itself is not part of the text
        matched = None
        if seq.detok is not None and text_ids:
            before = seq.detok.num_output_tokens
            matched = seq.detok.add_tokens(text_ids)
            if matched is not None:
                # a delta of several tokens (a decode worker's batched message, a speculative
                # step): those after the one that completed the stop string were never part of
                # the answer (the engine alone stops after that token): not in token_ids,
                # logprobs or the usage
                new_ids = new_ids[:seq.detok.num_output_tokens - before]
        seq.token_ids += new_ids
        if out.new_logprobs:
            for token, entry in zip(new_ids, out.new_logprobs):
                seq.logprobs.append(self._named(entry))
                seq.cumulative_logprob += entry[token].logprob
        if matched is not None:
            seq.finish_reason, seq.stop_reason = "stop", matched
            return out.finish_reason is None
        if out.finish_reason is not None:
            seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
        return False

    def fail(self, message: str) -> None:
        self.error = message

    def abort(self) -> None:
        """Every unfinished sequence ends here with finish_reason "abort" (the front end stopped
        the request: a shutdown's grace period ran out), its text so far kept."""
        for s in self.seqs:
            if s.finish_reason is None:
                s.finish_reason = "abort"

    def _metrics(self, out: EngineOutput) -> None:
        m = self.metrics
        if out.new_token_ids and m.first_token_time is None:
            m.first_token_time = time.time()
        if out.first_scheduled_time is not None and m.first_scheduled_time is None:
            m.first_scheduled_time = out.first_scheduled_time
        if out.index == 0:
            if out.num_cached_tokens is not None:
                m.num_cached_prompt_tokens = out.num_cached_tokens
            if out.num_computed_prompt_tokens is not None:
                m.num_computed_prompt_tokens = out.num_computed_prompt_tokens
            self.set_prompt_logprobs(out.prompt_logprobs)

    def set_prompt_logprobs(self, entries: list[TokenLogprobs | None] | None) -> None:
        """The prompt's logprobs, from whichever engine computed the prompt (the first to report)."""
        if entries is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None if e is None else self._named(e) for e in entries]

    def _named(self, entry: TokenLogprobs) -> TokenLogprobs:
        if self.tokenizer is None:
            return entry
        decode = self.tokenizer.decode
        return {t: Logprob(lp.logprob, lp.rank, decode([t], skip_special_tokens=False)) for t, lp in entry.items()}

    def output(self) -> RequestOutput:
        finished = self.finished
        error = self.error
        completions = []
        for i, s in enumerate(self.seqs):
            done = s.finish_reason is not None or error is not None
            want_lps = self.params.logprobs is not None
            completions.append(CompletionOutput(
                index=i, text=s.detok.visible_text(done) if s.detok is not None else "",
                token_ids=list(s.token_ids), cumulative_logprob=s.cumulative_logprob if want_lps else None,
                logprobs=list(s.logprobs) if want_lps else None,
                finish_reason=s.finish_reason or ("error" if error is not None else None),
                stop_reason=s.stop_reason))
        if finished and self.metrics.finished_time is None:
            self.metrics.finished_time = time.time()
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
                             outputs=completions, finished=finished, prompt_logprobs=self.prompt_logprobs,
                             metrics=self.metrics, num_cached_tokens=self.metrics.num_cached_prompt_tokens,
                             error=error)


class OutputProcessor:
    """RequestStates of many requests at once (the offline `LLM`'s front end)."""

    def __init__(self, tokenizer: TokenizerLike | None):
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
            arrival_time: float | None = None) -> RequestState:
        state = self.states[request_id] = RequestState(self.tokenizer, request_id, prompt, prompt_token_ids,
                                                       params, arrival_time)
        return state

    def process(self, outputs: list[EngineOutput]) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """(one RequestOutput per request that changed, sequences a stop string ended)."""
        changed: dict[str, RequestState] = {}
        stopped = []
        for out in outputs:
            state = self.states.get(out.request_id)
            if state is None:
                continue
            if state.add(out):
                stopped.append((out.request_id, out.index))
            changed[out.request_id] = state
        results = []
        for rid, state in changed.items():
            results.append(state.output())
            if state.finished:
                del self.states[rid]
        return results, stopped
