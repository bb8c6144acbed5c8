"""Routing decisions: one cost function that weighs cached-prefix overlap against load (pure, torch-free).

The router asks the prefix index how many leading blocks of the prompt each live instance holds
(`hit_blocks`), reads each instance's load, and sends the request where it costs least:

    cost(i) = (prompt_blocks - hit_blocks(i)) * cost_per_block          work this request adds on i
            + (requests(i) + kv_pressure(i)) * blocks_per_request      work already queued on i

    requests(i)        = what this router has in flight on i + the other routers' share of i's
                         last heartbeat (InstancePool.requests)
    kv_pressure(i)     = 0 below KV_PRESSURE_FROM (80%) KV usage, rising to 1 at 100%: a nearly
                         full cache (preemption ahead) counts as up to one more request. Below
                         that, usage says little, and a heartbeat-old value would only add noise.
    blocks_per_request = the router's running mean of *uncached* prompt blocks per request: the
                         price of one queued request in the same unit as the prompt's own work.
                         Hits-heavy traffic makes queued requests cheap (affinity wins); cold
                         traffic makes them expensive (load wins). Never below 1 block.
    cost_per_block     = 1 when the instance computes the prompt (prefill, or decode without a
                         handoff); `pull_cost_per_block` (< 1) for a decode that only pulls the
                         blocks it lacks from the prefill.

Hot-spot guard: an instance whose load exceeds max(hot_spot_factor * mean, mean + hot_spot_excess)
over its role's candidates gets no credit for its hits, so a popular prefix cannot pile every
request onto one instance; it then competes on load alone. Ties go to the instance this router
has sent fewer requests (spreads cold prompts evenly), then to the smaller id.

Conditional disaggregation (`plan_route`): a prompt shorter than `disagg_min_prompt_tokens`, or
whose uncached part on the decode instance that would compute it is shorter, skips prefill and
goes straight to decode (DecodeRequest without a handle: decode computes it). 0 disables it.

    prompt --> hit_blocks per instance (one Redis call) --> direct = best decode at cost_per_block 1
           --> uncached(direct) < threshold ?  yes: Route(prefill=None, decode=direct)
                                               no:  Route(best prefill, best decode at pull cost)

Modes: "prefix" (the above), "load" (hits ignored: least loaded), "round_robin" (rotation over the
candidates; load and hits ignored; used as the baseline in benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("prefix", "load", "round_robin")
KV_PRESSURE_FROM = 0.8


@dataclass(frozen=True)
class RoutingConfig:
    mode: str = "prefix"
    # 64 tokens (4 blocks of 16): below this, computing the prompt on the decode instance costs
    # less than a second RPC hop plus a KV pull, and a short prefill barely disturbs decode's batch.
    disagg_min_prompt_tokens: int = 64
    pull_cost_per_block: float = 0.25  # pulling a block, relative to computing it
    hot_spot_factor: float = 1.5
    hot_spot_excess: float = 4.0  # requests above the mean before the factor applies
    initial_blocks_per_request: float = 8.0  # until the router has measured its traffic
    min_blocks_per_request: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"routing mode must be one of {MODES}, got {self.mode!r}")
        if self.disagg_min_prompt_tokens < 0:
            raise ValueError(f"disagg_min_prompt_tokens must be >= 0, got {self.disagg_min_prompt_tokens}")
        if not 0 <= self.pull_cost_per_block <= 1:
            raise ValueError(f"pull_cost_per_block must be in [0, 1], got {self.pull_cost_per_block}")
        if self.hot_spot_factor < 1 or self.hot_spot_excess < 0:
            raise ValueError("hot_spot_factor must be >= 1 and hot_spot_excess >= 0")


@dataclass(frozen=True)
class Candidate:
    """One instance as the cost function sees it."""
    instance_id: str
    requests: float  # running + waiting + sent by this router since the last load report
    kv_usage: float = 0.0  # 0..1
    hit_blocks: int = 0  # leading prompt blocks it holds (prefix index)
    num_routed: int = 0  # requests this router has sent it in total (tie-break)


@dataclass(frozen=True)
class Scored:
    candidate: Candidate
    cost: float
    hit_blocks: int  # the hits the cost counted (0 on a hot spot)
    hot: bool


@dataclass
class Route:
    """Where one request goes. `prefill` None: decode computes the prompt (conditional disagg)."""
    prefill: str | None
    decode: str | None
    hit_blocks: dict[str, int] = field(default_factory=dict)  # per instance, as looked up
    reason: str = ""  # "disagg", "short_prompt", "cached_on_decode", "no_prefill"


def hot_spots(candidates: list[Candidate], config: RoutingConfig) -> set[str]:
    """Instances whose load is far above their role's mean: their prefix hits are not credited."""
    if len(candidates) < 2:
        return set()
    mean = sum(c.requests for c in candidates) / len(candidates)
    limit = max(config.hot_spot_factor * mean, mean + config.hot_spot_excess)
    return {c.instance_id for c in candidates if c.requests > limit}


def score(candidates: list[Candidate], prompt_blocks: int, max_hit_blocks: int, cost_per_block: float,
          blocks_per_request: float, config: RoutingConfig) -> list[Scored]:
    """The cost of sending a prompt of `prompt_blocks` blocks to each candidate (see the module doc).
    `max_hit_blocks` caps the hits an engine can use (its last prompt token is always computed)."""
    hot = hot_spots(candidates, config)
    per_request = max(blocks_per_request, config.min_blocks_per_request)
    scored = []
    for c in candidates:
        hits = 0 if c.instance_id in hot or config.mode != "prefix" else min(c.hit_blocks, max_hit_blocks)
        pressure = max(c.kv_usage - KV_PRESSURE_FROM, 0.0) / (1 - KV_PRESSURE_FROM)
        cost = (prompt_blocks - hits) * cost_per_block + (c.requests + pressure) * per_request
        scored.append(Scored(c, cost, hits, c.instance_id in hot))
    return scored


def best(scored: list[Scored]) -> Scored | None:
    return min(scored, key=lambda s: (s.cost, s.candidate.num_routed, s.candidate.instance_id), default=None)


def plan_route(num_prompt_tokens: int, block_size: int, prefill: list[Candidate], decode: list[Candidate],
               blocks_per_request: float, config: RoutingConfig, rotation: int = 0) -> Route:
    """Choose (prefill, decode) for one prompt. `rotation` is the round-robin position (mode
    round_robin only). Pure: everything it needs is in its arguments."""
    prompt_blocks = -(-num_prompt_tokens // block_size)
    max_hits = (num_prompt_tokens - 1) // block_size
    hits = {c.instance_id: c.hit_blocks for c in prefill + decode}
    if config.mode == "round_robin":
        return _round_robin(num_prompt_tokens, prefill, decode, hits, config, rotation)

    direct = best(score(decode, prompt_blocks, max_hits, 1.0, blocks_per_request, config))
    if direct is None:
        return Route(None, None, hits, "no_decode")
    threshold = config.disagg_min_prompt_tokens
    if num_prompt_tokens < threshold:
        return Route(None, direct.candidate.instance_id, hits, "short_prompt")
    uncached = num_prompt_tokens - direct.hit_blocks * block_size
    if uncached < threshold:
        return Route(None, direct.candidate.instance_id, hits, "cached_on_decode")
    first = best(score(prefill, prompt_blocks, max_hits, 1.0, blocks_per_request, config))
    if first is None:
        return Route(None, direct.candidate.instance_id, hits, "no_prefill")
    then = best(score(decode, prompt_blocks, max_hits, config.pull_cost_per_block, blocks_per_request, config))
    return Route(first.candidate.instance_id, then.candidate.instance_id, hits, "disagg")


def _round_robin(num_prompt_tokens: int, prefill: list[Candidate], decode: list[Candidate],
                 hits: dict[str, int], config: RoutingConfig, rotation: int) -> Route:
    """The baseline: the n-th request goes to the n-th instance of each role (sorted by id).
    Only the prompt-length rule of conditional disaggregation applies (no cache knowledge)."""
    if not decode:
        return Route(None, None, hits, "no_decode")
    dec = sorted(decode, key=lambda c: c.instance_id)[rotation % len(decode)].instance_id
    if num_prompt_tokens < config.disagg_min_prompt_tokens:
        return Route(None, dec, hits, "short_prompt")
    if not prefill:
        return Route(None, dec, hits, "no_prefill")
    pre = sorted(prefill, key=lambda c: c.instance_id)[rotation % len(prefill)].instance_id
    return Route(pre, dec, hits, "disagg")
