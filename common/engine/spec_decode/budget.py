"""DraftBudget: how many of its n-gram drafts each request feeds to a verify step.

A draft row is worth the tokens it is expected to add, and costs what one more token costs the
step. On a GPU a verify step's extra rows cost little (they replay the decode graphs); on a CPU
a step is compute-bound from ~16 rows on (SmolLM2 bf16, 2 cores: the 30 layers' GEMMs take
11 ms at 16 rows, 30 ms at 48, 74 ms at 144; docs/benchmarks.md), so 16 requests with 8 drafts
each made every step ~2.3x dearer for ~1.3x the tokens. The budget feeds a draft position only
while the tokens it adds per second of step beat the step's own:

    step cost      C(T) = a + b * T        T: the step's tokens; fitted online (least squares,
                                           older steps decaying) on the steps that ran only
                                           decodes and verify chunks, from their wall time
    draft j of r   gain g_j = p_r * q_2 .. q_j   the chance that drafts 1..j are all accepted:
                                           p_r request r's rate of accepting its first draft
                                           (under a prior of every request's), q_i every
                                           request's rate of accepting draft i given 1..i-1 were
    feed           positions by gain, highest first, while g > b * N / C, where N (the tokens
                   the step yields: one per sampling request + the gains fed so far) and C (its
                   cost, + b per fed row) are updated as positions are added

Until the fit has seen steps of different sizes every draft is fed (as without a budget). The
step's wall time is the cost only where the forward runs on the host thread (the CPU); with a
GPU it is queued, so "auto" feeds all drafts there (`SpeculativeConfig.draft_budget`).
"""

from __future__ import annotations

DECAY = 0.98  # weight of the previous observations at each new step (~50 steps of memory)
MIN_STEPS = 8  # decode-only steps seen before the fit is used
MIN_SPREAD = 2.0  # ... and the standard deviation of their token counts (a slope needs different sizes)
PRIOR = 2.0  # weight (in rounds) of every request's first-draft acceptance in a request's own
MAX_POSITIONS = 64  # draft positions tracked (>= MAX_SPECULATIVE_TOKENS)


class DraftBudget:
    def __init__(self):
        self._w = self._t = self._tt = self._c = self._tc = 0.0  # decayed sums over (tokens, seconds)
        self._steps = 0
        # every request's rounds (decayed): per draft position, how often it was reached (verified)
        # and passed (accepted)
        self._reached = [0.0] * MAX_POSITIONS
        self._passed = [0.0] * MAX_POSITIONS
        self._first: dict[str, list[float]] = {}  # req_id -> [rounds whose first draft was accepted, rounds]
        self.num_trimmed = 0  # drafts proposed but not fed (tests, bench)

    # ---- the cost of a step ---------------------------------------------------------------------
    def observe_step(self, tokens: int, seconds: float) -> None:
        """A step that ran only decodes and verify chunks: `tokens` rows in `seconds` of wall."""
        d = DECAY
        self._w = d * self._w + 1.0
        self._t = d * self._t + tokens
        self._tt = d * self._tt + tokens * tokens
        self._c = d * self._c + seconds
        self._tc = d * self._tc + tokens * seconds
        self._steps += 1

    def cost_model(self) -> tuple[float, float] | None:
        """(a, b) seconds: a step of T tokens costs a + b * T; None until the fit can be trusted."""
        if self._steps < MIN_STEPS:
            return None
        mean_t = self._t / self._w
        var_t = self._tt / self._w - mean_t * mean_t
        if var_t < MIN_SPREAD * MIN_SPREAD:
            return None
        b = max(0.0, (self._tc / self._w - mean_t * self._c / self._w) / var_t)
        a = max(0.0, self._c / self._w - b * mean_t)
        return a, b

    # ---- the worth of a draft -------------------------------------------------------------------
    def observe_round(self, req_id: str, fed: int, accepted: int) -> None:
        """A verified round of request `req_id`: `accepted` of its `fed` drafts accepted."""
        if not fed:
            return
        d = DECAY
        for j in range(min(fed, accepted + 1)):  # positions reached: 0 .. accepted (the first rejected)
            self._reached[j] = d * self._reached[j] + 1.0
            self._passed[j] = d * self._passed[j] + (j < accepted)
        mine = self._first.setdefault(req_id, [0.0, 0.0])
        mine[0] += accepted > 0
        mine[1] += 1.0

    def gains(self, req_id: str, n: int) -> list[float]:
        """The chance that request `req_id`'s drafts 1..j are all accepted, j = 1..n: its own rate
        for the first draft (under a prior of everyone's), everyone's for each next one given the
        ones before (n-gram drafts that start well tend to go on: a copied passage)."""
        reached, passed = self._reached, self._passed
        prior = (passed[0] + 1.0) / (reached[0] + 2.0)
        won, seen = self._first.get(req_id, (0.0, 0.0))
        g = (won + PRIOR * prior) / (seen + PRIOR)
        out = [g]
        for j in range(1, n):
            g *= (passed[j] + 1.0) / (reached[j] + 2.0)
            out.append(g)
        return out

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self._first.pop(req_id, None)

    # ---- the step's drafts ----------------------------------------------------------------------
    def limits(self, offered: dict[str, int], num_tokens: int, num_sampling: int) -> dict[str, int] | None:
        """req_id -> drafts to feed (of `offered[req_id]` proposed) for a step of `num_tokens` tokens
        without drafts, `num_sampling` of whose requests sample a token; None: feed them all."""
        model = self.cost_model()
        if model is None:
            return None
        a, b = model
        if b <= 0.0:
            return None
        # every request's positions in order of gain: g_j falls with j (factors <= 1), so a
        # request's position j + 1 never comes before its position j
        gains = [(g, req_id) for req_id, n in offered.items() for g in self.gains(req_id, n)]
        gains.sort(reverse=True)
        tokens, cost = float(num_sampling), a + b * num_tokens
        fed = dict.fromkeys(offered, 0)
        for g, req_id in gains:
            if g * cost <= b * tokens:  # g / b <= tokens / cost: this row would lower the yield
                break
            fed[req_id] += 1
            tokens += g
            cost += b
        self.num_trimmed += sum(offered.values()) - sum(fed.values())
        return fed
