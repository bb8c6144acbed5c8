"""Draft-model proposer: a smaller model sharing the target's vocabulary drafts tokens one by one.

Where the draft's KV lives: in its own KV tensors (`ModelRunner` of the draft model: its layers
and heads differ from the target's), addressed through the *target's* block tables. Slot
(block b, offset o) holds the target's KV for a position in the target's tensors and the
draft's KV for the same position in the draft's. So there is one allocator and one admission
decision (the scheduler's), no second pool to run out or to leak, and the rollback of rejected
drafts (the scheduler's num_computed_tokens and `free_tail`) is the draft's too. The draft pool
has as many blocks as the target's; the target sizes its pool for both (`draft_bytes_per_block`).

Prefix-cache hits and pulled prompts (a decode worker) hold only the *target's* KV, so the draft
never trusts blocks it did not fill for this request: per request it tracks how many leading
positions it has computed (`_DraftState.num_computed`, 0 for a new or preempted request) and
catches up over the rest of the history in chunks of at most the step's token budget.

The prompt: its chunks are fed to the draft in the step that prefills them in the target
(`prefill`, right after that step is queued), so a first proposal catches up over one token.

One proposal for a request with n draft slots:

    catch up:  feed history[num_computed : N]        -> sample d1 at position N
    draft:     feed d1 at N, d2 at N+1 ...            -> d2 .. dn (greedy), d2 .. d(n+1) (T > 0)

Each round's tokens stay on the device: the next round's input is a PLACEHOLDER_TOKEN that the
draft runner fills there (as overlapped steps do), so the rounds queue back to back and the host
waits once, for all drafts, at the end (`propose`). Greedy drafts are not waited for at all
(`propose_on_device`): the target's verify step reads them on the device and returns them with
its result (DeviceDrafts.settle), and behind that verify step `draft_ahead` feeds the last draft
and the target's token after it, sampling the next proposal's d1 for the outcome where every
draft is accepted:

    ahead:     feed dn at N+n-1, x at N+n            -> d1' at N+n+1 (kept if all n accepted:
                                                        the next proposal feeds d1' on)

At temperature > 0 it drafts one more token than it feeds: the target's last row is then
decided by Leviathan's rule too, so every position after the first output token is decided the
same way whatever the step boundaries (seeded outputs do not depend on the route or on k).
The next proposal keeps the fed drafts that the target accepted (they are history now).

Draft tokens of seeded requests come from `draft_position_seed(seed, pos)`, a stream apart
from the target's position_seed (rejection.py needs them independent).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from pdserve.common.config import ArchConfig, CacheConfig, ConfigError, ModelConfig, SchedulerConfig, SpeculativeConfig
from pdserve.common.engine.model_runner import ModelRunner, model_dtype, position_seed, resolve_device
from pdserve.common.engine.outputs import PLACEHOLDER_TOKEN, ScheduledRequest, SchedulerOutput
from pdserve.common.engine.sampler import processed_probs, row_argmax, to_device
from pdserve.common.models.loader import read_arch_config, resolve_model_path

DRAFT_STREAM = 0x2545F4914F6CDD1D >> 2  # xor-ed into position seeds: the draft's own stream
DECODE_ROWS_MAX = 16  # catch-ups up to this long run as one-token rows where the draft has graphs


@dataclasses.dataclass
class _Ahead:
    """The first drafts of the next proposals, sampled right behind a verify step (draft_ahead)."""
    tokens: torch.Tensor  # [S] on the device
    index: dict[str, int]  # req_id -> its draft in `tokens`
    at: dict[str, int]  # req_id -> the request's length (positions) if every draft is accepted
    timer: DeviceTimer  # its device time


@dataclasses.dataclass
class _DraftState:
    num_computed: int = 0  # leading positions whose draft KV is valid
    fed_drafts: list[int] = dataclasses.field(default_factory=list)  # fed at num_computed.. last round
    head: _Ahead | None = None  # its next proposal's first draft, sampled ahead (kept by settle_ahead)


class DraftModelProposer:
    def __init__(self, config: SpeculativeConfig, model_cfg: ModelConfig, target_arch: ArchConfig,
                 max_model_len: int, scheduler_cfg: SchedulerConfig, enforce_eager: bool):
        """Reads the draft's architecture and checks it against the target (no weights yet)."""
        self.path = resolve_model_path(config.model)
        self.arch = read_arch_config(self.path)
        if self.arch.vocab_size > target_arch.vocab_size:
            raise ConfigError(f"--speculative-config: the draft model's vocabulary ({self.arch.vocab_size}) is larger "
                              f"than the target's ({target_arch.vocab_size}): it must share the tokenizer")
        if max_model_len > self.arch.max_position_embeddings:
            raise ConfigError(f"--speculative-config: the draft model's context ({self.arch.max_position_embeddings}) "
                              f"is shorter than --max-model-len {max_model_len}")
        self.model_cfg = dataclasses.replace(model_cfg, model=self.path, tokenizer=None, served_model_name=None,
                                             load_format="dummy" if model_cfg.load_format == "dummy" else "auto",
                                             graph_sampler=True)  # greedy rounds: the tail graph's tokens
        self.dtype = model_dtype(model_cfg.dtype, self.path, resolve_device(model_cfg.device))  # the runner's
        self.max_model_len = max_model_len
        self.scheduler_cfg = scheduler_cfg
        self.enforce_eager = enforce_eager
        self.runner = None
        self.decode_rows = False
        self.target_vocab = target_arch.vocab_size
        self._states: dict[str, _DraftState] = {}
        self.num_ahead = 0  # requests whose next first draft was sampled behind their verify step
        self.num_heads_used = 0  # ... and whose next proposal started from it (every draft accepted)

    def draft_bytes_per_block(self, block_size: int) -> int:
        a = self.arch
        return 2 * a.num_layers * block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize

    def weight_bytes(self) -> int:
        """The draft's weights (an estimate from its shape, for the target's GPU memory budget)."""
        a = self.arch
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        layer = a.hidden_size * (q + 2 * kv) + q * a.hidden_size + 3 * a.hidden_size * a.intermediate_size
        embed = a.vocab_size * a.hidden_size * (1 if a.tie_word_embeddings else 2)
        return (a.num_layers * layer + embed) * self.dtype.itemsize

    def start(self, num_blocks: int, block_size: int) -> None:
        """Load the draft's weights and its KV tensors (as many blocks as the target's pool)."""
        cache = CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=False)
        self.runner = ModelRunner(self.model_cfg, cache, self.arch, self.path, self.max_model_len,
                                  scheduler_cfg=self.scheduler_cfg, enforce_eager=self.enforce_eager)
        self.device = self.runner.device
        # short catch-ups as one-token rows (decoder.py: then every round is a decode-only step
        # that the draft's CUDA graphs replay)
        self.decode_rows = self.runner.graphs is not None
        self._gen = torch.Generator(device=self.device)
        self._shared = torch.Generator(device=self.device)
        self._shared.manual_seed(self.model_cfg.seed ^ DRAFT_STREAM)

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self._states.pop(req_id, None)
        if self.runner is not None:
            self.runner.forget(req_ids)

    def propose(self, reqs: list[ScheduledRequest]) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        """req_id -> (drafts, their draft distributions [len, V] at temperature > 0, else None)."""
        rounds, drafts, probs = self._draft_rounds(reqs)
        values = torch.cat(rounds).tolist() if rounds else []  # the one wait for the device
        out = {}
        for rid, refs in drafts.items():
            d = [values[j] for j in refs]
            self._states[rid].fed_drafts = d[:-1]
            out[rid] = (d, torch.stack(probs[rid]) if probs[rid] else None)
        return out

    def propose_on_device(self, reqs: list[ScheduledRequest]) -> "DeviceDrafts":
        """`propose` for greedy requests without waiting for the device: the drafts stay there,
        each request's in a run of their own (DeviceDrafts), for the target's verify step to read
        as its input (placeholders filled on the device) and to return with its result
        (DeviceDrafts.settle then records them, as `propose` does at once)."""
        timer = DeviceTimer(self.device)
        rounds, drafts, _ = self._draft_rounds(reqs)
        offsets, order = {}, []
        for rid, refs in drafts.items():
            offsets[rid] = len(order)
            order += refs
        tokens = torch.cat(rounds)
        if order != list(range(len(order))):  # batched: each request's drafts from every round, in a run
            tokens = tokens.index_select(0, to_device(order, torch.int64, tokens.device))
        return DeviceDrafts(tokens, offsets, {rid: len(refs) for rid, refs in drafts.items()}, self._states,
                            timer.stop())

    def _draft_rounds(self, reqs: list[ScheduledRequest]):
        """The draft's rounds for `reqs`, queued on the device -> (each round's sampled tokens [S],
        req_id -> indices of its drafts into torch.cat(rounds), req_id -> its draft distributions)."""
        feeds: dict[str, tuple[ScheduledRequest, int, list[int]]] = {}  # req_id -> (s, start pos, tokens to feed)
        want, drafts, probs = {}, {}, {}  # drafts: req_id -> indices into all rounds' sampled tokens
        rounds, num_sampled = [], 0  # sampled tokens [S] of each round on the device; their count
        sampled_at: dict[str, int] = {}  # req_id -> its latest token's index in torch.cat(rounds)
        last_round: dict[str, int] = {}  # req_id -> its index in rounds[-1], for those sampled there
        for s in reqs:
            st = self._states.setdefault(s.req_id, _DraftState())
            num_tokens = len(s.prompt_token_ids) + len(s.output_token_ids)
            head, st.head = st.head, None
            if head is not None and head.at[s.req_id] == num_tokens == st.num_computed:  # d1 sampled ahead
                if not rounds or rounds[-1] is not head.tokens:
                    rounds.append(head.tokens)
                    num_sampled += len(head.tokens)
                    last_round = {}
                i = last_round[s.req_id] = head.index[s.req_id]
                sampled_at[s.req_id] = num_sampled - len(head.tokens) + i
                want[s.req_id], drafts[s.req_id], probs[s.req_id] = s.num_spec_slots, [sampled_at[s.req_id]], []
                if want[s.req_id] > 1:
                    feeds[s.req_id] = (s, num_tokens, [PLACEHOLDER_TOKEN])
                st.fed_drafts = []
                self.num_heads_used += 1
                continue
            accepted = 0
            for d, t in zip(st.fed_drafts, _history_from(s, st.num_computed)):
                if d != t:
                    break
                accepted += 1
            start = min(st.num_computed + accepted, num_tokens - 1)
            feeds[s.req_id] = (s, start, _history_from(s, start))
            want[s.req_id] = s.num_spec_slots + (s.params.temperature != 0)
            drafts[s.req_id], probs[s.req_id] = [], []
            st.num_computed, st.fed_drafts = num_tokens, []
        budget = self.scheduler_cfg.token_budget
        while feeds:
            batch, left = [], budget
            for s, start, tokens in feeds.values():
                take = min(len(tokens), left)
                if take <= 0:
                    break
                sample = take == len(tokens)
                if self.decode_rows and take <= DECODE_ROWS_MAX:
                    batch += [dataclasses.replace(s, input_token_ids=[t], start_pos=start + j,
                                                  sample=sample and j == take - 1, num_spec_slots=0)
                              for j, t in enumerate(tokens[:take])]
                else:
                    batch.append(dataclasses.replace(s, input_token_ids=tokens[:take], start_pos=start,
                                                     sample=sample, num_spec_slots=0))
                left -= take
            if rounds:  # the placeholders' tokens: the last round's alone where it sampled all of them
                holes = [b.req_id for b in batch if b.input_token_ids[0] == PLACEHOLDER_TOKEN]
                self.runner._last_sampled = (rounds[-1], last_round) if all(r in last_round for r in holes) \
                    else (torch.cat(rounds), dict(sampled_at))  # (one left out of a round by the budget)
            sampled, drafted, rows = self._round(SchedulerOutput(scheduled=batch, num_batched_tokens=budget - left))
            for b in batch:  # advance the feeds by what ran
                s, start, tokens = feeds[b.req_id]
                feeds[b.req_id] = (s, start + b.num_tokens, tokens[b.num_tokens:])
            rounds.append(drafted)  # on the device: a later round reads them there
            sampled_at.update((b.req_id, num_sampled + i) for i, b in enumerate(sampled))
            last_round = {b.req_id: i for i, b in enumerate(sampled)}
            for i, b in enumerate(sampled):
                drafts[b.req_id].append(num_sampled + i)
                if rows is not None and b.params.temperature != 0:
                    probs[b.req_id].append(rows[i])
                s, start, _ = feeds.pop(b.req_id)
                if len(drafts[b.req_id]) < want[b.req_id]:
                    feeds[b.req_id] = (s, start, [PLACEHOLDER_TOKEN])  # filled from `drafted` on the device
            num_sampled += len(sampled)
        return rounds, drafts, probs

    def draft_ahead(self, items: list[tuple[ScheduledRequest, int]], pairs: torch.Tensor) -> _Ahead:
        """Right behind a verify step, on the device's queue before its result is known: for
        each (s, p) of `items` (greedy, n drafts, the last one d_n the verify step's input at
        position p), feed d_n at p and the target's token after it (its row n's) at p + 1 -> the
        draft for p + 2, which is the next proposal's d1 if every draft is accepted. `pairs`
        [2 * len(items)]: each request's d_n and that token, on the device. The host then applies
        the result while the device runs this round; `settle_ahead` keeps a request's draft
        when every draft was accepted (its next proposal feeds from d1 on), else drops it (the
        positions it wrote are past what the draft counts as computed: fed again later)."""
        timer = DeviceTimer(self.device)
        batch = []
        for s, pos in items:
            if self.decode_rows:
                batch += [dataclasses.replace(s, input_token_ids=[PLACEHOLDER_TOKEN], start_pos=pos + j,
                                              sample=j == 1, num_spec_slots=0) for j in (0, 1)]
            else:
                batch.append(dataclasses.replace(s, input_token_ids=[PLACEHOLDER_TOKEN] * 2, start_pos=pos,
                                                 sample=True, num_spec_slots=0))
        self.runner._last_sampled = (pairs, {s.req_id: 2 * i for i, (s, _) in enumerate(items)})
        self.runner.fill_runs = True  # a request's second placeholder: its index + 1
        try:
            sampled, tokens, _ = self._round(SchedulerOutput(scheduled=batch, num_batched_tokens=2 * len(items)))
        finally:
            self.runner.fill_runs = False
        self.num_ahead += len(items)
        return _Ahead(tokens, {b.req_id: i for i, b in enumerate(sampled)}, {s.req_id: pos + 2 for s, pos in items},
                      timer.stop())

    def settle_ahead(self, ahead: _Ahead, req_id: str, all_accepted: bool) -> None:
        """A verify step's result for a request that draft_ahead drafted for (module docstring)."""
        st = self._states.get(req_id)
        if st is None:  # (forgotten meanwhile)
            return
        if all_accepted:  # the draft's KV holds every position before ahead.at: d1 comes from there
            st.num_computed, st.fed_drafts, st.head = ahead.at[req_id], [], ahead
        else:
            st.head = None

    def prefill(self, reqs: list[ScheduledRequest]) -> bool:
        """The prompt chunks among the requests of a step the target has just launched, fed to the
        draft too (its KV at the same positions, nothing sampled), so that a request's first proposal
        feeds only its first output token. Without it that proposal caught up over the whole prompt (eagerly: one long
        chunk, ~7-45 ms of host time on an H200 for SmolLM2's ~200-token prompts), inside the first
        decode step: a stall between the first and second output tokens. Queued after the target's
        step, so the target's first token is not behind it on the device. A chunk past what the draft
        computed (a prefix-cache hit) is fed from there. Returns whether anything was fed."""
        feeds = []
        for s in reqs:
            end = s.start_pos + s.num_tokens
            if end > len(s.prompt_token_ids) or s.params.needs_host_history or s.params.has_token_mask:
                continue  # (not a prompt chunk; requests that never speculate)
            st = self._states.setdefault(s.req_id, _DraftState())
            if st.num_computed < end:
                feeds.append((s, st.num_computed, s.prompt_token_ids[st.num_computed:end]))
                st.num_computed, st.fed_drafts = end, []
        fed, budget = bool(feeds), self.scheduler_cfg.token_budget
        while feeds:
            batch, left, rest = [], budget, []
            for s, start, tokens in feeds:
                take = min(len(tokens), left)
                if take > 0:
                    batch.append(dataclasses.replace(s, input_token_ids=tokens[:take], start_pos=start, sample=False,
                                                     num_spec_slots=0))
                    left -= take
                if take < len(tokens):
                    rest.append((s, start + take, tokens[take:]))
            self.runner.forward_only(SchedulerOutput(scheduled=batch, num_batched_tokens=budget - left))
            feeds = rest
        return fed

    def _round(self, sched: SchedulerOutput) -> tuple[list[ScheduledRequest], torch.Tensor, torch.Tensor | None]:
        """One forward pass of the draft -> (the sampled requests in row order, their draft tokens
        [S] on the device, their draft distributions [S, V] when any is random, else None). All
        greedy: the tokens from the greedy tail (after a decode graph its tail graph: no logits)."""
        if all(s.params.temperature == 0 for s in sched.scheduled if s.sample):
            sampled, tokens = self.runner.forward_greedy(sched)
            return sampled, tokens, None
        sampled, logits = self.runner.forward_logits(sched)
        return (sampled, *self._sample(logits, sampled))

    def _sample(self, logits: torch.Tensor, reqs: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft tokens [S] (on the device) of the sampled rows (logits [S, Vd]) and, when any row
        is random, the rows' draft distributions padded to the target's vocabulary [S, V]."""
        tokens = row_argmax(logits)
        random = [i for i, s in enumerate(reqs) if s.params.temperature != 0]
        if not random:
            return tokens, None
        probs = processed_probs(logits, reqs)
        probs = probs / probs.sum(dim=-1, keepdim=True)  # normalized after top-k/p/min-p (rejection.py)
        noise = torch.empty_like(probs)
        for i in random:
            s = reqs[i]
            position = s.start_pos + s.num_tokens
            g = self._shared if s.params.seed is None else self._gen.manual_seed(
                draft_position_seed(s.params.seed, position))
            noise[i].exponential_(generator=g)
        index = to_device(random, torch.int64, logits.device)
        tokens.index_copy_(0, index, (probs.index_select(0, index) / noise.index_select(0, index)).argmax(dim=-1))
        if probs.shape[1] < self.target_vocab:
            probs = torch.nn.functional.pad(probs, (0, self.target_vocab - probs.shape[1]))
        return tokens, probs


class DeviceTimer:
    """Device time from now until the work queued before stop() is done (CUDA events); elsewhere
    (the CPU runs the work as it is queued) the host's time."""

    def __init__(self, device: torch.device):
        self.t0 = time.perf_counter()
        self.events = None
        if device.type == "cuda":
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()

    def stop(self) -> "DeviceTimer":
        if self.events is None:
            self.elapsed = time.perf_counter() - self.t0
        else:
            self.events[1].record()
        return self

    def done(self) -> bool:
        return self.events is None or self.events[1].query()

    def seconds(self, wait: bool = False) -> float:
        """The time, once the device has run the work (e.g. after a readback of a later step);
        wait=True waits for it first."""
        if self.events is None:
            return self.elapsed
        start, end = self.events
        if wait:
            end.synchronize()
        return start.elapsed_time(end) / 1000


@dataclasses.dataclass
class DeviceDrafts:
    """Greedy drafts left on the device (DraftModelProposer.propose_on_device)."""
    tokens: torch.Tensor  # [D] int64: request r's drafts at offsets[r] .. offsets[r] + counts[r] - 1
    offsets: dict[str, int]
    counts: dict[str, int]
    _states: dict[str, _DraftState]
    timer: DeviceTimer  # the device time from propose_on_device's start until the drafts were there

    def settle(self, values: list[int]) -> dict[str, list[int]]:
        """`tokens` read back (values) -> req_id -> its drafts; the proposer records the fed ones."""
        out = {}
        for rid, at in self.offsets.items():
            d = out[rid] = values[at:at + self.counts[rid]]
            st = self._states.get(rid)
            if st is not None:  # (forgotten meanwhile: finished or preempted)
                st.fed_drafts = d[:-1]
        return out


def draft_position_seed(seed: int, position: int) -> int:
    return position_seed(seed, position) ^ DRAFT_STREAM


def _history_from(s: ScheduledRequest, start: int) -> list[int]:
    """The request's tokens (prompt + output) from position `start` on, without copying the rest."""
    num_prompt = len(s.prompt_token_ids)
    if start >= num_prompt:
        return s.output_token_ids[start - num_prompt:]
    return s.prompt_token_ids[start:] + s.output_token_ids
