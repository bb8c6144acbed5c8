"""Verify rounds chained on the device: n-gram speculation of a lone greedy request, no host between rounds.

At batch 1 a verify step's device time (~0.8 ms for SmolLM2's 9 rows on an H200) is about what
the host spends between its result and the next launch (0.41 ms: update, schedule, lookup,
flatten, staging), so the device idled a third of the time. Here one engine step runs R rounds
back to back, everything a round needs decided on the device:

    hist [C] (prompt + output tokens, then each round's tokens), n = its valid length (a tensor)
    round r:  drafts, m = lookup(hist[:n])                 # the same rule as ngram.lookup, in torch ops
              rows    = [hist[n-1], d1 .. dk]  at positions n-1 .. n-1+k, slots from the block row
              x       = argmax of the target at each row   # the decode graph of k + 1 rows + its tail
              a       = leading drafts equal to x (of the m found)
              hist[n .. n+k] = x;  n += a + 1              # x0 .. xa are the round's tokens
    readback: every round's x, a + 1 and m: one copy to the host after the last round

The host enqueues the R rounds' work without waiting (on CUDA three graph replays a round: the
lookup and the rows' inputs as one Triton kernel (kernels/ngram_round.round_inputs), the decode
graph of k + 1 rows with its greedy tail, the acceptance as one kernel (round_accept); far less
host time than the round's device time), then the engine applies the step's tokens
at once: the scheduler reserved KV slots for R (k + 1) tokens (`Scheduler._allocate`), so no
round writes past the request's blocks, and `max_draft_tokens`' room keeps all of them within
max_tokens and max_model_len. Rows past a round's accepted drafts wrote KV that the next round
rewrites or nobody reads (as any rejected draft's). A stop (EOS, a stop token or string) inside
a step ends the request there (update() stops at it); the rounds after it were wasted.

Only for a step of one request, greedy with nothing sampled on the host (no logprobs,
penalties, token masks or logit bias), at one rank: the scheduler asks for it (a decode with
nothing else running or waiting) and the runner runs it (SpecDecoder.rounds). A new request
waits for the step in flight, R rounds (~3 ms at R = 4 on an H200).
"""

from __future__ import annotations

import numpy as np
import torch

from pdserve.common.engine.outputs import RunnerOutput, ScheduledRequest
from pdserve.common.engine.sampler import row_argmax
from pdserve.common.models.attention import StepInputs

DEFAULT_ROUNDS = 4  # device_rounds on CUDA when the config leaves it out (docs/speculative.md)
HISTORY_QUANTUM = 1024  # the on-device history's capacity grows by this much (a fixed shape per capacity)


def resolve_rounds(rounds: int | None, device: torch.device) -> int:
    """SpeculativeConfig.device_rounds on this device: rounds per step (0: one, drafts from the host)."""
    if rounds is None:
        return DEFAULT_ROUNDS if device.type == "cuda" else 0
    return rounds if rounds > 1 else 0


def lookup(hist: torch.Tensor, length: torch.Tensor, min_n: int, max_n: int, k: int):
    """ngram.lookup on the device: hist [C] int64 (the first `length` tokens valid; length a 0-d
    int64 tensor, >= 1) -> (drafts [k] int64: the tokens after the latest earlier occurrence of
    the longest suffix of length min_n..max_n, count: how many of them are real (0-d; 0 when no
    suffix matches)). Fixed shapes, no host sync: every position j is scored by how far the
    tokens ending at j equal the suffix (at most max_n, never past the history's start), the
    longest run (>= min_n) wins and the latest j among those."""
    cap = hist.shape[0]
    j = torch.arange(cap, device=hist.device)
    last = length - 1
    run = j < last  # an earlier occurrence ends before the last token
    score = torch.zeros(cap, dtype=torch.int64, device=hist.device)
    for m in range(max_n):
        target = hist.index_select(0, (last - m).clamp(min=0).view(1))  # the suffix's m-th token from the end
        shifted = hist.roll(m)  # shifted[j] = hist[j - m]
        run = run & (shifted == target) & (j >= m) & (last > m)
        score += run
    score = torch.where(score >= min_n, score * cap + j, -1)
    best, at = score.max(0)
    start = at + 1
    count = torch.where(best >= 0, (length - start).clamp(max=k), 0)
    drafts = hist.index_select(0, (start + torch.arange(k, device=hist.device)).clamp(max=cap - 1))
    return drafts, count


class _Buffers:
    """One history capacity's device state: what a round reads and writes in place, so that on
    CUDA a round's work around the forward replays as two captured graphs (`pre`, `post`)."""

    def __init__(self, cap: int, max_blocks: int, max_rounds: int, n: int, device: torch.device):
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.int64, device=device)  # noqa: E731
        self.hist = zeros(cap)  # the request's tokens, then each round's (rows past `length`: garbage)
        self.length = zeros()  # valid tokens in hist: the input token is hist[length - 1]
        self.table = zeros(max_blocks)  # the request's block ids
        self.round = zeros()  # the round being run: its row of xs / took / found
        self.xs = zeros(max_rounds, n)  # each round's argmax tokens
        self.took = zeros(max_rounds)  # accepted drafts + 1 per round
        self.found = zeros(max_rounds)  # drafts found per round
        self.rows = torch.arange(n, device=device)
        self.drafts, self.count = zeros(n - 1), zeros()  # a round's drafts (kernels/ngram_round.py)
        self.ids = self.positions = self.slots = None  # the torch path's inputs of a round
        self.pre: torch.cuda.CUDAGraph | None = None
        self.post: dict[bool, torch.cuda.CUDAGraph] = {}  # by grouped (the tail buffer it reads)


class DeviceRounds:
    """The runner's rounds for one request (module docstring); one instance per SpecDecoder."""

    def __init__(self, runner, k: int, min_n: int, max_n: int, rounds: int):
        self.runner = runner
        self.k, self.min_n, self.max_n, self.rounds = k, min_n, max_n, rounds
        self._buffers: dict[int, _Buffers] = {}  # by history capacity
        self._pool = None  # the captured graphs' memory pool (CUDA)
        self.num_steps = 0  # steps that ran rounds (tests: the path ran)
        self.num_rounds = 0

    def wants(self, s: ScheduledRequest) -> int:
        """How many rounds the scheduled request's draft slots make room for (0: not this path)."""
        n = self.k + 1
        return (s.num_spec_slots + 1) // n if s.num_spec_slots > self.k else 0

    def launch(self, s: ScheduledRequest, num_rounds: int, out: RunnerOutput):
        """Queue the rounds of `s` (a decode whose slots hold num_rounds * (k + 1) tokens) ->
        (readback [num_rounds * (k + 3)] int64 on the device, finish(host list) filling `out`)."""
        runner, n = self.runner, self.k + 1
        known = list(s.prompt_token_ids) + list(s.output_token_ids)
        length0 = len(known)
        assert s.start_pos == length0 - 1, "a rounds step starts at the request's last token"
        from pdserve.common.engine.spec_decode.decoder import GROUPED_MIN_CONTEXT
        graphs = runner.graphs
        graphed = graphs is not None and graphs.can_replay_rows(n)
        grouped = graphed and runner.spec._row_groups and length0 >= GROUPED_MIN_CONTEXT and graphs.groups_rows(n)
        b = self._buffers_for(length0 + num_rounds * n + n, num_rounds, graphed, grouped)
        table_np = np.asarray(s.block_ids, dtype=np.int64)
        b.hist[:length0].copy_(torch.tensor(known, dtype=torch.int64))
        b.table[:len(table_np)].copy_(torch.from_numpy(table_np))
        b.length.fill_(length0)
        b.round.zero_()
        if graphed:
            graphs.stage_rows(n, table_np, grouped)
        for _ in range(num_rounds):
            if graphed:
                b.pre.replay()
                graphs.replay_rows(n, grouped)
                b.post[grouped].replay()
            else:
                self._pre(b)
                self._post(b, self._forward_eager(b.ids, b.positions, b.slots, table_np))
        self.num_steps += 1
        self.num_rounds += num_rounds
        readback = torch.cat([b.xs[:num_rounds].flatten(), b.took[:num_rounds], b.found[:num_rounds]])
        req_id = s.req_id

        def finish(values: list[int]) -> None:
            tokens, rounds_done = [], []
            steps = values[num_rounds * n:num_rounds * (n + 1)]
            counts = values[num_rounds * (n + 1):]
            for r in range(num_rounds):
                tokens += values[r * n:r * n + steps[r]]
                rounds_done.append((counts[r], steps[r] - 1))
            out.sampled_token_ids[req_id] = tokens[-1]
            out.spec_token_ids[req_id] = tokens[:-1]  # update() appends them all (drafts accepted)
            out.num_accepted_tokens[req_id] = len(tokens) - 1
            out.spec_rounds[req_id] = rounds_done
        return readback, finish

    def _pre(self, b: _Buffers) -> None:
        """A round's drafts and rows from the history: ids [t, d1 .. dk], positions, slots (in
        torch ops: the CPU's path and the reference of kernels/ngram_round.round_inputs)."""
        block = self.runner.block_size
        drafts, count = lookup(b.hist, b.length, self.min_n, self.max_n, self.k)
        b.drafts.copy_(drafts)
        b.count.copy_(count)
        b.ids = torch.cat([b.hist.index_select(0, (b.length - 1).view(1)), b.drafts])
        b.positions = b.length - 1 + b.rows
        b.slots = b.table.index_select(0, b.positions // block) * block + b.positions % block

    def _post(self, b: _Buffers, x: torch.Tensor) -> None:
        """A round's argmax tokens x [k + 1] -> the drafts accepted (the leading ones equal to x,
        of those found), x into the history past its valid tokens, the round's record (torch
        ops: the reference of kernels/ngram_round.round_accept)."""
        k = self.k
        accepted = ((b.drafts == x[:k]) & (b.rows[:k] < b.count)).cumprod(0).sum()
        b.hist.index_copy_(0, b.length + b.rows, x)
        at = b.round.view(1)
        b.xs.index_copy_(0, at, x.view(1, -1))
        b.took.index_copy_(0, at, (accepted + 1).view(1))
        b.found.index_copy_(0, at, b.count.view(1))
        b.length += accepted + 1
        b.round += 1

    def _buffers_for(self, size: int, num_rounds: int, graphed: bool, grouped: bool) -> _Buffers:
        """The buffers of the smallest capacity (a multiple of HISTORY_QUANTUM, doubling) holding
        `size` tokens; on CUDA their round graphs, captured on first use."""
        cap = HISTORY_QUANTUM
        while cap < size:
            cap *= 2
        runner, n = self.runner, self.k + 1
        b = self._buffers.get(cap)
        if b is None or b.xs.shape[0] < num_rounds:
            max_blocks = -(-(runner.max_model_len + n * (self.rounds + 1)) // runner.block_size)
            b = self._buffers[cap] = _Buffers(cap, max_blocks, max(self.rounds, num_rounds), n, runner.device)
        if graphed and (b.pre is None or grouped not in b.post):
            self._capture(b, grouped)
        return b

    def _capture(self, b: _Buffers, grouped: bool) -> None:
        """pre (kernels/ngram_round.round_inputs: the lookup, the rows' inputs written into the
        decode graph's static buffers) and post (round_accept, reading the tail graph's tokens)
        as CUDA graphs; each run once before its capture (compiled), on a state that every step
        resets."""
        from pdserve.kernels.ngram_round import round_accept, round_inputs
        graphs, n, k = self.runner.graphs, self.k + 1, self.k
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        inputs, tokens = graphs.row_inputs(n), graphs.rows_tokens(n, grouped)
        bodies = {"pre": lambda: round_inputs(b.hist, b.length, b.table, b.drafts, b.count, *inputs,
                                              self.runner.block_size, self.min_n, self.max_n, k),
                  "post": lambda: round_accept(b.hist, b.length, b.round, b.drafts, b.count, tokens,
                                               b.xs, b.took, b.found, k)}
        for name, body in bodies.items():
            if name == "pre" and b.pre is not None:
                continue
            b.length.fill_(1)
            b.round.zero_()
            body()
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                body()
            if name == "pre":
                b.pre = graph
            else:
                b.post[grouped] = graph
        torch.cuda.synchronize(self.runner.device)

    def _forward_eager(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       table_np: np.ndarray) -> torch.Tensor:
        """A round's k + 1 rows without graphs (the CPU; CUDA under --enforce-eager): the runner's
        own inputs from host arrays (a sync where the device is a GPU), its greedy tail."""
        runner, n = self.runner, self.k + 1
        pos = positions.cpu().numpy().astype(np.int32)
        step = StepInputs(num_decodes=n, input_ids=ids.cpu().numpy().astype(np.int32), positions=pos,
                          slot_mapping=slots.cpu().numpy().astype(np.int32),
                          query_start_loc=np.arange(n + 1, dtype=np.int32), context_lens=pos + 1,
                          block_table=np.repeat(table_np.astype(np.int32)[None], n, 0),
                          sample_rows=np.arange(n, dtype=np.int32))
        input_ids, positions_t, meta, _ = runner.inputs.prepare(step)
        hidden = runner.model(input_ids, positions_t, runner.kv_caches, meta)
        if runner.greedy_tail is not None:
            return runner.greedy_tail(hidden)
        return row_argmax(runner.model.compute_logits(hidden))
