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

The host enqueues the R rounds' kernels without waiting (on CUDA ~40 small launches and two graph
replays a round, less than the round's device time), then the engine applies the step's tokens
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


class DeviceRounds:
    """The runner's rounds for one request (module docstring); one instance per SpecDecoder."""

    def __init__(self, runner, k: int, min_n: int, max_n: int, rounds: int):
        self.runner = runner
        self.k, self.min_n, self.max_n, self.rounds = k, min_n, max_n, rounds
        self._hist: torch.Tensor | None = None  # [capacity] int64 on the device
        self.num_steps = 0  # steps that ran rounds (tests: the path ran)
        self.num_rounds = 0

    def wants(self, s: ScheduledRequest) -> int:
        """How many rounds the scheduled request's draft slots make room for (0: not this path)."""
        n = self.k + 1
        return (s.num_spec_slots + 1) // n if s.num_spec_slots > self.k else 0

    def launch(self, s: ScheduledRequest, num_rounds: int, out: RunnerOutput):
        """Queue the rounds of `s` (a decode whose slots hold num_rounds * (k + 1) tokens) ->
        (readback [num_rounds * (k + 3)] int64 on the device, finish(host list) filling `out`)."""
        runner, k = self.runner, self.k
        dev, n = runner.device, k + 1
        known = list(s.prompt_token_ids) + list(s.output_token_ids)
        length0 = len(known)
        assert s.start_pos == length0 - 1, "a rounds step starts at the request's last token"
        hist = self._history(length0 + num_rounds * n + n)
        hist[:length0].copy_(torch.tensor(known, dtype=torch.int64), non_blocking=False)
        length = torch.tensor(length0, dtype=torch.int64, device=dev)
        block = runner.block_size
        table_np = np.asarray(s.block_ids, dtype=np.int32)
        table = torch.from_numpy(table_np.astype(np.int64)).to(dev)
        rows = torch.arange(n, device=dev)
        xs = torch.empty((num_rounds, n), dtype=torch.int64, device=dev)
        took = torch.empty(num_rounds, dtype=torch.int64, device=dev)  # a + 1 per round
        found = torch.empty(num_rounds, dtype=torch.int64, device=dev)  # drafts found per round
        from pdserve.common.engine.spec_decode.decoder import GROUPED_MIN_CONTEXT
        graphs = runner.graphs
        graphed = graphs is not None and graphs.can_replay_rows(n)
        grouped = graphed and runner.spec._row_groups and length0 >= GROUPED_MIN_CONTEXT and graphs.groups_rows(n)
        if graphed:
            graphs.stage_rows(n, table_np, grouped)
        for r in range(num_rounds):
            drafts, count = lookup(hist, length, self.min_n, self.max_n, k)
            ids = torch.cat([hist.index_select(0, (length - 1).view(1)), drafts])
            positions = length - 1 + rows
            slots = table.index_select(0, positions // block) * block + positions % block
            if graphed:
                x = graphs.replay_rows(n, ids, positions, slots, grouped)
            else:
                x = self._forward_eager(ids, positions, slots, table_np)
            accepted = ((drafts == x[:k]) & (rows[:k] < count)).cumprod(0).sum()
            hist.index_copy_(0, length + rows, x)
            xs[r] = x
            took[r] = accepted + 1
            found[r] = count
            length += accepted + 1
        self.num_steps += 1
        self.num_rounds += num_rounds
        readback = torch.cat([xs.flatten(), took, found])
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

    def _history(self, size: int) -> torch.Tensor:
        if self._hist is None or self._hist.shape[0] < size:
            cap = -(-size // HISTORY_QUANTUM) * HISTORY_QUANTUM
            self._hist = torch.zeros(cap, dtype=torch.int64, device=self.runner.device)
        return self._hist

    def _forward_eager(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       table_np: np.ndarray) -> torch.Tensor:
        """A round's k + 1 rows without graphs (the CPU; CUDA under --enforce-eager): the runner's
        own inputs from host arrays (a sync where the device is a GPU), its greedy tail."""
        runner, n = self.runner, self.k + 1
        pos = positions.cpu().numpy().astype(np.int32)
        step = StepInputs(num_decodes=n, input_ids=ids.cpu().numpy().astype(np.int32), positions=pos,
                          slot_mapping=slots.cpu().numpy().astype(np.int32),
                          query_start_loc=np.arange(n + 1, dtype=np.int32), context_lens=pos + 1,
                          block_table=np.repeat(table_np[None], n, 0), sample_rows=np.arange(n, dtype=np.int32))
        input_ids, positions_t, meta, _ = runner.inputs.prepare(step)
        hidden = runner.model(input_ids, positions_t, runner.kv_caches, meta)
        if runner.greedy_tail is not None:
            return runner.greedy_tail(hidden)
        return row_argmax(runner.model.compute_logits(hidden))
