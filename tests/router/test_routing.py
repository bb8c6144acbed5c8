"""The routing cost function (pure, exact numbers) and InstancePool.route over a real redis-server:
prefix holder vs load, hot-spot guard, conditional disaggregation, round robin, Redis outage."""

import asyncio
import subprocess
import sys
import time

import pytest

from pdserve.common.block_hash import hash_blocks
from pdserve.services.router.instances import InstancePool
from pdserve.common.prefix_index import PrefixIndex
from pdserve.common.registry import InstanceInfo, Load, Registry
from pdserve.services.router.routing import Candidate, RoutingConfig, hot_spots, plan_route, score

BS = 16
CFG = RoutingConfig()


def costs(cands, prompt_blocks, bpr, per_block=1.0, cfg=CFG, max_hits=None):
    max_hits = prompt_blocks - 1 if max_hits is None else max_hits
    return {s.candidate.instance_id: s.cost for s in score(cands, prompt_blocks, max_hits, per_block, bpr, cfg)}


def test_cost_is_uncached_work_plus_queued_work():
    # 13-block prompt; p0 holds 12 blocks and runs 2 requests, p1 is idle and cold
    cands = [Candidate("p0", requests=2, hit_blocks=12), Candidate("p1", requests=0)]
    # hit-heavy traffic (1 block per queued request): affinity wins, 1 + 2 * 1 = 3 < 13
    assert costs(cands, 13, bpr=1.0) == {"p0": 3.0, "p1": 13.0}
    # cold traffic (13 blocks per queued request): the queue costs more than recomputing
    assert costs(cands, 13, bpr=13.0) == {"p0": 1.0 + 26.0, "p1": 13.0}
    # KV usage above 80% counts as up to one more request (0.9 -> 0.5); a per-request price below
    # 1 block is raised to 1
    assert costs([Candidate("p0", requests=1, kv_usage=0.9)], 4, bpr=0.2) == pytest.approx({"p0": 4 + 1.5})
    assert costs([Candidate("p0", requests=1, kv_usage=0.5)], 4, bpr=0.2) == {"p0": 4 + 1.0}


def test_cold_prompt_goes_to_the_least_loaded():
    prefill = [Candidate("p0", 3), Candidate("p1", 1), Candidate("p2", 2)]
    decode = [Candidate("d0", 1), Candidate("d1", 0)]
    route = plan_route(200, BS, prefill, decode, blocks_per_request=4, config=CFG)
    assert (route.prefill, route.decode, route.reason) == ("p1", "d1", "disagg")


def test_prefix_holder_wins_and_ties_spread_by_requests_sent():
    prefill = [Candidate("p0", 1, hit_blocks=12), Candidate("p1", 0)]
    decode = [Candidate("d0", 0, num_routed=5), Candidate("d1", 0, num_routed=4)]
    route = plan_route(208, BS, prefill, decode, blocks_per_request=2, config=CFG)
    assert (route.prefill, route.decode) == ("p0", "d1")  # d0 / d1 tie on cost: fewer sent wins
    assert route.hit_blocks == {"p0": 12, "p1": 0, "d0": 0, "d1": 0}


def test_hot_spot_yields_affinity_to_load():
    # mean load 5: the limit is max(1.5 * 5, 5 + 4) = 9, so p0 at 10 is a hot spot
    cands = [Candidate("p0", 10, hit_blocks=12), Candidate("p1", 0)]
    assert hot_spots(cands, CFG) == {"p0"}
    assert costs(cands, 13, bpr=1.0) == {"p0": 13.0 + 10.0, "p1": 13.0}
    assert plan_route(208, BS, cands, [Candidate("d0", 0)], 1.0, CFG).prefill == "p1"
    # at 9 it is not hot yet and its hits still count: 1 + 9 < 13
    assert hot_spots([Candidate("p0", 9, hit_blocks=12), Candidate("p1", 1)], CFG) == set()
    assert plan_route(208, BS, [Candidate("p0", 9, hit_blocks=12), Candidate("p1", 1)],
                      [Candidate("d0", 0)], 1.0, CFG).prefill == "p0"
    assert hot_spots([Candidate("p0", 100)], CFG) == set()  # alone: nothing to yield to


def test_hits_are_capped_below_the_last_prompt_token():
    # 64 tokens = 4 full blocks, but the engine always computes the last token: 3 usable hits
    cands = [Candidate("d0", 0, hit_blocks=4)]
    assert costs(cands, 4, bpr=1.0, max_hits=(64 - 1) // BS) == {"d0": 1.0}


def test_conditional_disaggregation():
    prefill = [Candidate("p0", 0)]
    cold, warm = Candidate("d0", 0), Candidate("d1", 0, hit_blocks=12)
    # short prompt: straight to decode
    assert plan_route(40, BS, prefill, [cold], 1.0, CFG).reason == "short_prompt"
    assert plan_route(40, BS, prefill, [cold], 1.0, CFG).prefill is None
    # 200 tokens, 192 cached on d1: 8 uncached < 64 -> d1 computes it, no prefill
    route = plan_route(200, BS, prefill, [cold, warm], 1.0, CFG)
    assert (route.prefill, route.decode, route.reason) == (None, "d1", "cached_on_decode")
    # 200 tokens, nothing cached: disaggregated
    assert plan_route(200, BS, prefill, [cold], 1.0, CFG).reason == "disagg"
    # threshold 0: always disaggregated; no prefill instance: decode computes
    always = RoutingConfig(disagg_min_prompt_tokens=0)
    assert plan_route(5, BS, prefill, [warm], 1.0, always).reason == "disagg"
    assert plan_route(200, BS, [], [cold], 1.0, CFG).reason == "no_prefill"
    assert plan_route(200, BS, prefill, [], 1.0, CFG).decode is None


def test_decode_after_a_prefill_weighs_load_over_its_cheap_pull_savings():
    # after a prefill decode only pulls what it lacks (0.25 per block): 12 hits save 3, one request costs 4
    decode = [Candidate("d0", 1, hit_blocks=12), Candidate("d1", 0)]
    route = plan_route(208, BS, [Candidate("p0", 0)], decode, 4.0, RoutingConfig(disagg_min_prompt_tokens=0))
    assert route.decode == "d1"
    assert costs(decode, 13, 4.0, per_block=0.25) == {"d0": 0.25 + 4.0, "d1": 13 * 0.25}


def test_modes_load_and_round_robin():
    prefill = [Candidate("p1", 0), Candidate("p0", 5, hit_blocks=12)]
    decode = [Candidate("d0", 0), Candidate("d1", 0)]
    load = RoutingConfig(mode="load")
    assert plan_route(208, BS, prefill, decode, 1.0, load).prefill == "p1"  # hits ignored
    rr = RoutingConfig(mode="round_robin")
    picks = [(r.prefill, r.decode) for r in (plan_route(208, BS, prefill, decode, 1.0, rr, n) for n in range(3))]
    assert picks == [("p0", "d0"), ("p1", "d1"), ("p0", "d0")]
    assert plan_route(10, BS, prefill, decode, 1.0, rr, 1).reason == "short_prompt"


def test_config_is_validated():
    for bad in (dict(mode="random"), dict(disagg_min_prompt_tokens=-1), dict(pull_cost_per_block=2),
                dict(hot_spot_factor=0.5)):
        with pytest.raises(ValueError):
            RoutingConfig(**bad)


# ---- InstancePool.route over a real Redis ------------------------------------------------------
def _info(iid: str, role: str) -> InstanceInfo:
    return InstanceInfo(iid, role, "127.0.0.1:1", "", "tiny", BS, 512)


def test_pool_routes_to_the_holder_and_survives_redis_outages(redis_server):
    prompt = list(range(1000, 1000 + 13 * BS))  # 13 full blocks

    async def body():
        async with Registry(redis_server.url) as registry, PrefixIndex(redis_server.url) as workers_view:
            for iid, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")):
                await registry.register(_info(iid, role))
                await registry.heartbeat(iid, Load())
            await workers_view.publish("p1", stored=hash_blocks(prompt, BS), removed=[])
            pool = InstancePool(Registry(redis_server.url), PrefixIndex(redis_server.url, timeout_s=0.25),
                                RoutingConfig(disagg_min_prompt_tokens=0))
            await pool.refresh()
            route = await pool.route(prompt)
            assert (route.prefill, route.hit_blocks["p1"], route.hit_blocks["p0"]) == ("p1", 13, 0)

            redis_server.stop()
            route = await pool.route(prompt)  # the lookup fails: load only, no error
            assert set(route.hit_blocks.values()) == {0} and route.prefill in ("p0", "p1") and not pool.redis_ok
            await pool.refresh()  # still down: the last known instances stay
            assert [i.instance_id for i, _ in pool.instances] == ["d0", "d1", "p0", "p1"]
            assert pool.num_redis_outages == 1

            redis_server.start()  # back, empty: the workers re-register and republish (not here)
            await registry.register(_info("p0", "prefill"))
            await registry.register(_info("d0", "decode"))
            await workers_view.publish("p0", stored=hash_blocks(prompt, BS), removed=[])
            await pool.refresh()
            assert pool.redis_ok and [i.instance_id for i, _ in pool.instances] == ["d0", "p0"]
            route = await pool.route(prompt)
            assert (route.prefill, route.decode) == ("p0", "d0") and route.hit_blocks == {"p0": 13, "d0": 0}
            await pool.close()
    asyncio.run(body())


def test_load_is_own_in_flight_plus_the_others_share_of_the_last_heartbeat():
    pool = InstancePool(Registry("redis://127.0.0.1:1/0"))  # never connects here
    info = _info("p0", "prefill")
    pool.begin("p0")
    pool.begin("p0")
    report = Load(num_running=4, num_waiting=1, updated_at=time.time())
    assert pool.requests(info, report) == 5  # 2 ours (exact) + 3 from other routers
    pool.end("p0")
    pool.end("p0")
    assert pool.requests(info, report) == 3  # ours finished; the others' 3 stay until the next report
    older = Load(num_running=1, updated_at=report.updated_at - 60)  # before anything of ours: all others'
    assert pool.requests(info, older) == 1
    assert pool.requests(info, None) == 0 and pool.num_routed == {"p0": 2}


def test_router_side_modules_are_torch_free():
    code = ("import sys; import pdserve.services.router.routing, pdserve.services.router.instances, "
            "pdserve.services.router.admin, pdserve.services.router.disagg_client; "
            "assert 'torch' not in sys.modules, 'the router imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
