"""Token masks of a step: grammars (xgrammar), allowed_token_ids and bad_words.

The engine core owns one `StructuredOutputManager`; it is the only thing the rest of the engine
sees of constrained decoding:

    EngineCore.validate(params)      compile the request's grammar now (LRU cache of compiled
                                     grammars, keyed by the spec): a bad regex/grammar -> 400
    runner.launch(sched, manager)    forward queued on the device, then
      manager.start_fill(sample_reqs, inflight_token) -> MaskFill (None: no row constrained)
                                       the rows as they are now; the runner registers
                                       MaskFill.tokens_arrived on the previous step's PendingOutput
    previous step's result() (engine thread) -> tokens_arrived(): every row accepts the token it
                                       had in flight (one batched xgrammar call), then worker
                                       threads fill the rows into a reused host buffer (pinned on
                                       CUDA) while the engine thread completes that step and
                                       schedules the next (mask_fill.py)
      MaskFill.join()                  (the runner, before the next step's inputs need this
                                       step's tokens) -> bitmask [B, ceil(V / 32)] int32 on the
                                       device (bit set: token allowed), copied non_blocking
      sampler.sample(..., bitmask)     masked logits are -inf before anything else
    scheduler.update -> touched
    manager.update(touched)          advance each matcher by the tokens appended since it last
                                     looked (one batched call; tokens_arrived has accepted those
                                     of the rows being filled) -> ids
                                     whose grammar ended (finish: stop) or broke
    manager.drop(finished ids)
    manager.fill(sample_reqs)        start_fill + join (speculative verification, tests)

The host work of a step (`MaskStats`) is hidden behind the forward only while it, and the engine
thread's own host work beside it, are shorter than the forward, so nothing in it is per-row Python
beyond list building: accepting tokens and filling rows are batched xgrammar calls, and the host
buffers are a ring reused under CUDA events (bitmask_buffers.py), not allocated per step.

Each request's matcher catches up with *all* its output tokens the first time it is looked at,
so tokens given at admission (a decode worker receives the first token its prefill worker
sampled; a resubmitted request carries what it had generated) advance it like sampled ones,
whoever created the Request. Overlapped steps keep running: a row whose previous token is still
in flight (its input is PLACEHOLDER_TOKEN) gets that token from `inflight_token(req_id)` once
the previous step's tokens are on the host (the runner has already queued this step's forward
behind it), and the matcher accepts it ahead of update(), which then finds it consumed. A row
whose matcher terminated on that token (the extra step of an ending request, whose token
update() drops) or broke is left unmasked.

A matcher accepts EOS only where the grammar may end and then terminates; a request whose
matcher terminated (e.g. with ignore_eos) finishes as stopped. Bad words follow vLLM: each word is
tokenized alone and after a space; a one-token word is always banned, a longer one bans its last
token when the output ends with the rest.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pdserve.common.engine.bitmask_buffers import BitmaskBuffers
from pdserve.common.engine.grammar_workers import GrammarWorkers
from pdserve.common.engine.mask_fill import MAX_BAD_WORD_CONTEXT, MaskFill, RequestState, Row, accept_tokens
from pdserve.common.engine.outputs import PLACEHOLDER_TOKEN, ScheduledRequest
from pdserve.common.request import Request
from pdserve.common.sampling_params import ParameterError, SamplingParams, StructuredOutputsParams

log = logging.getLogger("pdserve.structured")

MAX_GRAMMAR_THREADS = 8  # threads filling one step's mask rows (64 rows of ~0.1 ms need few)
DEFAULT_GRAMMAR_SHARES = 1  # Python worker threads among them (GIL hand-offs: grammar_workers.py)
GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept (a JSON schema's is ~10-500 KB)


def default_grammar_threads() -> int:
    """Half the cores this process may run on, at most MAX_GRAMMAR_THREADS (on a GPU host the
    other half stays for the engine thread and other processes)."""
    return max(1, min(MAX_GRAMMAR_THREADS, len(os.sched_getaffinity(0)) // 2))


class GrammarCompiler:
    """xgrammar over one tokenizer: spec -> compiled grammar (LRU by spec), -> new matchers.

    xgrammar is imported on first use (it imports transformers): engines that never see a
    grammar do not pay for it. Thread-safe: the API side compiles ahead of the engine thread."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...],
                 cache_size: int = GRAMMAR_CACHE_SIZE):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = [t for t in stop_token_ids if t < vocab_size]  # a config's EOS may lie past a small vocab
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler = None
        self.num_compiled = 0

    def _xgr(self):
        import xgrammar
        if self._compiler is None:
            from transformers import PreTrainedTokenizerFast
            hf = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.backend)
            info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                           stop_token_ids=self.stop_token_ids)
            # our LRU is the cache (keyed by spec, counted in grammars); xgrammar's would hold a copy
            self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        return xgrammar

    def compile(self, spec: StructuredOutputsParams):
        key = spec.key()
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
            xgr = self._xgr()
        compiled = self._compile(xgr, spec)  # outside the lock: compiles of other specs run in parallel
        with self._lock:
            self._cache[key] = compiled
            self.num_compiled += 1
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, xgr, spec: StructuredOutputsParams):
        import json
        c = self._compiler
        compact = spec.disable_any_whitespace
        try:
            if spec.json is not None:
                return c.compile_json_schema(json.dumps(spec.json), any_whitespace=not compact)
            if spec.json_object:
                return c.compile_json_schema('{"type": "object"}', any_whitespace=not compact, strict_mode=False)
            if spec.regex is not None:
                return c.compile_regex(spec.regex)
            if spec.choice is not None:
                return c.compile_grammar("root ::= " + " | ".join(json.dumps(s, ensure_ascii=False)
                                                                   for s in spec.choice))
            return c.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError) as e:  # xgrammar's parse errors carry a C++ location first
            message = str(e).strip().splitlines()[0]
            message = message.split(": ", 1)[1] if message.startswith("[") and ": " in message else message
            raise ParameterError(spec.param, f"cannot compile the {spec.kind} constraint: {message}") from None

    def matcher(self, compiled):
        import xgrammar
        return xgrammar.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids)


@dataclass
class MaskStats:
    """Host time of constrained decoding, summed over steps (benchmarks read deltas of it)."""
    num_fills: int = 0  # steps whose bitmask was filled
    accept_seconds: float = 0.0  # engine thread: the previous step's tokens accepted (one batched call)
    start_seconds: float = 0.0  # engine thread: the fill handed to the workers, until each share runs
    fill_seconds: float = 0.0  # worker threads: the fill started -> every row filled
    join_seconds: float = 0.0  # engine thread blocked in join, waiting for the fill (exposed host time)
    update_seconds: float = 0.0  # engine thread: matchers advanced by a step's other new tokens after it
    num_shares_taken_back: int = 0  # shares no worker had picked up when the engine thread needed them


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...],
                 device: torch.device | str = "cpu", num_threads: int | None = None,
                 num_shares: int = DEFAULT_GRAMMAR_SHARES):
        """`device`: where the sampler applies the masks (CUDA: pinned buffers, copied
        non_blocking); `num_threads`: threads filling the rows of a step beside the engine thread
        (None: `default_grammar_threads()`), `num_shares` of them Python workers, each with one
        xgrammar call whose C++ threads are the rest (grammar_workers.py)."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.num_words = -(-vocab_size // 32)  # bitmask width W
        self.grammars = GrammarCompiler(tokenizer, vocab_size, eos_token_ids) if tokenizer is not None else None
        threads = num_threads if num_threads is not None else default_grammar_threads()
        self._workers = GrammarWorkers(threads, min(num_shares, threads))
        self.stats = MaskStats()
        self._states: dict[str, RequestState] = {}
        self._buffers = BitmaskBuffers(self.num_words, torch.device(device))
        self._fill: MaskFill | None = None  # started, not joined yet
        self._stop_ids = frozenset(self.grammars.stop_token_ids if self.grammars is not None else ())

    # ---- admission --------------------------------------------------------------------------
    def validate(self, params: SamplingParams) -> None:
        """Token ids in range; the grammar compiles (it is cached for the request's first step)."""
        vocab = self.vocab_size
        for name, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ())):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise ParameterError(name, f"token id {bad} in {name} is outside the vocabulary [0, {vocab})")
        if (params.structured_outputs is not None or params.bad_words) and self.grammars is None:
            raise ParameterError("structured_outputs" if params.structured_outputs else "bad_words",
                                 "this engine has no tokenizer: structured outputs and bad_words need one")
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)

    def compile_ahead(self, params: SamplingParams) -> None:
        """Compile off the engine thread (the API side calls this in a worker thread)."""
        if params.structured_outputs is not None and self.grammars is not None:
            self.grammars.compile(params.structured_outputs)

    # ---- the step's mask --------------------------------------------------------------------
    def start_fill(self, reqs: list[ScheduledRequest], inflight_token: Callable[[str], int] | None = None
                   ) -> MaskFill | None:
        """The fill of the bitmask [B, W] of the step's sampled rows (mask_fill.py); None when no
        row has a constraint. `inflight_token(req_id)`: the token the previous step sampled for a
        row whose input is still in flight: then the fill starts at `MaskFill.tokens_arrived()`
        (the caller's, once those tokens are on the host; else join()), otherwise now."""
        rows = [(i, s) for i, s in enumerate(reqs)  # has_token_mask, inlined: once per row per step
                if (p := s.params).structured_outputs is not None or p.allowed_token_ids is not None or p.bad_words]
        if not rows:
            return None
        if self._fill is not None:  # never joined (its step failed): its workers finish first
            self._fill.cancel()
            self._fill = None
        work = []
        for i, s in rows:  # what the engine thread knows now: it appends to these lists meanwhile
            state = self._state(s.req_id, s.params)
            out = s.output_token_ids
            n = len(out)
            consumed = state.broken or state.num_accepted > n  # > n: the in-flight token is already consumed
            work.append(Row(i, s.req_id, state, [] if consumed else out[state.num_accepted:],
                            not consumed and inflight_token is not None and s.input_token_ids[-1] == PLACEHOLDER_TOKEN,
                            out[-MAX_BAD_WORD_CONTEXT:] if state.bad_words else None))
        fill = MaskFill(work, self._buffers.acquire(len(reqs)), inflight_token, self._stop_ids,
                        self._workers, self._finish_fill)
        self._fill = fill  # (set after: a fill with nothing in flight has already accepted and started)
        return fill

    def fill(self, reqs: list[ScheduledRequest], inflight_token: Callable[[str], int] | None = None
             ) -> torch.Tensor | None:
        """start_fill, then join: the bitmask on the manager's device (CUDA: queued as a
        non_blocking copy from a pinned buffer), or None when no row has a constraint."""
        fill = self.start_fill(reqs, inflight_token)
        return fill.join() if fill is not None else None

    def _finish_fill(self, fill: MaskFill, bitmask: torch.Tensor) -> torch.Tensor:
        """On the engine thread, the fill's shares done: queue the copy, count the time."""
        t0 = time.perf_counter()
        self._fill = None
        out = self._buffers.to_device(bitmask)
        stats = self.stats
        stats.num_fills += 1
        stats.accept_seconds += fill.accept_seconds
        stats.start_seconds += fill.start_seconds
        if fill.done_at and fill.started_at is not None:
            stats.fill_seconds += max(fill.done_at) - fill.started_at
        stats.join_seconds += t0 - fill.joined_at
        stats.num_shares_taken_back += fill.num_taken_back
        return out

    # ---- after the step ---------------------------------------------------------------------
    def update(self, touched: list[Request]) -> tuple[list[str], list[str]]:
        """Advance the matchers by the new tokens: -> (ids whose grammar ended, ids whose output
        the grammar rejects). Finished requests' state is dropped. With a fill in flight its rows
        have accepted the tokens already (tokens_arrived: now if nothing called it)."""
        fill = self._fill
        if fill is None and not self._states:
            return [], []  # no constrained request: nothing to look up per request
        t0 = time.perf_counter()
        if fill is not None:
            fill.tokens_arrived()
        live = []
        for req in touched:
            state = self._states.get(req.request_id)
            if state is None:
                continue
            if req.is_finished():
                del self._states[req.request_id]
            elif state.matcher is not None:
                live.append((req, state))
        work = [(state, self._unseen(state, req.output_token_ids)) for req, state in live]
        work = [w for w in work if w[1]]
        if work:  # one batched call; after the fill in flight if it reads one of these matchers
            if fill is not None and any(id(state) in fill.state_ids for state, _ in work):
                fill.wait_done()
            accept_tokens(work, self._stop_ids)
        ended, broken = [], []
        for req, state in live:
            if state.broken:
                if not state.broken_reported:
                    state.broken_reported = True
                    broken.append(req.request_id)
            elif state.terminated:
                ended.append(req.request_id)
        self.stats.update_seconds += time.perf_counter() - t0
        return ended, broken

    def drop(self, req_ids) -> None:
        for req_id in req_ids:
            self._states.pop(req_id, None)

    @property
    def num_requests(self) -> int:
        return len(self._states)

    @property
    def num_threads(self) -> int:
        return self._workers.num_threads

    @property
    def num_shares(self) -> int:
        return self._workers.max_shares

    def set_threads(self, num_threads: int, num_shares: int | None = None) -> None:
        """Between steps (benchmarks sweep them); num_shares None: kept (at most num_threads)."""
        if self._fill is not None:
            self._fill.cancel()
            self._fill = None
        shares = num_shares if num_shares is not None else self._workers.max_shares
        self._workers = GrammarWorkers(num_threads, min(shares, num_threads))

    # ---- per-request state ------------------------------------------------------------------
    def _state(self, req_id: str, params: SamplingParams) -> RequestState:
        state = self._states.get(req_id)
        if state is None:
            matcher = None
            if params.structured_outputs is not None:
                matcher = self.grammars.matcher(self.grammars.compile(params.structured_outputs))
            allowed = None
            if params.allowed_token_ids is not None:
                allowed = np.zeros(self.num_words, np.uint32)
                ids = np.asarray(params.allowed_token_ids, np.int64)
                np.bitwise_or.at(allowed, ids >> 5, np.left_shift(1, ids & 31).astype(np.uint32))
            state = self._states[req_id] = RequestState(matcher, allowed, self._bad_word_ids(params.bad_words))
        return state

    @staticmethod
    def _unseen(state: RequestState, output_token_ids: list[int]) -> list[int]:
        """The output tokens the matcher has not accepted."""
        if state.broken or state.num_accepted > len(output_token_ids):
            return []
        return output_token_ids[state.num_accepted:]

    def _bad_word_ids(self, words: list[str]) -> list[tuple[int, ...]]:
        """vLLM's rule: the word as given (leading space stripped) and after a space, the second
        kept when it is a different token sequence of the same length."""
        out = []
        for word in words:
            alone = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if alone:
                out.append(tuple(alone))
            if spaced and (not alone or (spaced[0] != alone[0] and len(spaced) == len(alone))):
                out.append(tuple(spaced))
        return out
