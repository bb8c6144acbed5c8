"""Registry and Heartbeater against a real redis-server: liveness by TTL, fleet consistency,
operator changes, and recovery when Redis restarts empty."""

import asyncio
import subprocess
import sys
import time

import pytest
from redis.exceptions import RedisError

from pdserve.common.registry import (Heartbeater, InstanceInfo, InstanceNotFoundError, Load,
                                              RegistrationError, Registry)


def _info(instance_id: str, role: str = "prefill", model: str = "smollm2",
          block_size: int = 16) -> InstanceInfo:
    return InstanceInfo(instance_id=instance_id, role=role, grpc_address="127.0.0.1:5000",
                        kv_address="tcp://127.0.0.1:4000", model=model, block_size=block_size,
                        num_blocks=1000)


async def _wait_for(predicate, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_register_heartbeat_list(redis_url):
    async def body():
        async with Registry(redis_url, ttl_s=5) as registry:
            await registry.register(_info("p0", "prefill"))
            await registry.register(_info("d0", "decode"))
            await registry.register(_info("b0", "both"))
            record = await registry.heartbeat("d0", Load(num_running=3, num_waiting=1, kv_usage=0.5,
                                                         num_free_blocks=500))
            assert (record.instance_id, record.role, record.status) == ("d0", "decode", "serving")

            listed = await registry.list_instances()
            assert [info.instance_id for info, _ in listed] == ["b0", "d0", "p0"]
            loads = {info.instance_id: load for info, load in listed}
            assert loads["p0"] is None  # registered, no heartbeat yet
            d0 = loads["d0"]
            assert (d0.num_running, d0.num_waiting, d0.kv_usage, d0.num_free_blocks) == (3, 1, 0.5, 500)
            assert abs(d0.updated_at - time.time()) < 5

            assert [i.instance_id for i, _ in await registry.list_instances("prefill")] == ["b0", "p0"]
            assert [i.instance_id for i, _ in await registry.list_instances("decode")] == ["b0", "d0"]
            assert [i.instance_id for i, _ in await registry.list_instances("both")] == ["b0"]
            with pytest.raises(ValueError, match="role must be one of"):
                await registry.list_instances("router")
    asyncio.run(body())


def test_info_round_trips_through_redis(redis_url):
    async def body():
        async with Registry(redis_url) as registry:
            info = _info("p0")
            await registry.register(info)
            assert (await registry.get("p0"))[0] == info
            assert await registry.get("nobody") is None
    asyncio.run(body())


def test_mismatched_block_size_is_refused(redis_url):
    async def body():
        async with Registry(redis_url) as registry:
            await registry.register(_info("p0", block_size=16))
            with pytest.raises(RegistrationError) as error:
                await registry.register(_info("d0", "decode", block_size=32))
            message = str(error.value)
            assert "'d0' has block_size 32" in message and "'p0' has block_size 16" in message
            assert [i.instance_id for i, _ in await registry.list_instances()] == ["p0"]
    asyncio.run(body())


def test_mismatched_model_is_refused(redis_url):
    async def body():
        async with Registry(redis_url) as registry:
            await registry.register(_info("p0", model="smollm2"))
            with pytest.raises(RegistrationError, match="'d0' serves model 'llama3' but live instance 'p0' "
                                                        "serves 'smollm2'"):
                await registry.register(_info("d0", "decode", model="llama3"))
            await registry.register(_info("p1", model="smollm2"))  # same fleet config: accepted
    asyncio.run(body())


def test_ttl_expiry_removes_instance_and_its_constraints(redis_url):
    async def body():
        async with Registry(redis_url, ttl_s=0.3) as registry:
            await registry.register(_info("p0", block_size=16))
            await registry.heartbeat("p0", Load())
            await asyncio.sleep(0.5)
            assert await registry.list_instances() == []
            with pytest.raises(InstanceNotFoundError):
                await registry.heartbeat("p0", Load())
            await registry.register(_info("p1", block_size=32))  # the dead p0 no longer constrains
            assert [i.block_size for i, _ in await registry.list_instances()] == [32]
    asyncio.run(body())


def test_heartbeats_keep_an_instance_alive(redis_url):
    async def body():
        async with Registry(redis_url, ttl_s=0.3) as registry:
            await registry.register(_info("p0"))
            for _ in range(6):  # 0.6 s in total: twice the TTL
                await asyncio.sleep(0.1)
                await registry.heartbeat("p0", Load(num_running=1))
            assert [i.instance_id for i, _ in await registry.list_instances()] == ["p0"]
    asyncio.run(body())


def test_deregister(redis_url):
    async def body():
        async with Registry(redis_url) as registry:
            await registry.register(_info("p0"))
            await registry.heartbeat("p0", Load())
            await registry.deregister("p0")
            assert await registry.list_instances() == []
            assert await registry.get("p0") is None
    asyncio.run(body())


def test_operator_drain_and_role_switch_survive_heartbeats(redis_url):
    async def body():
        async with Registry(redis_url, ttl_s=5) as registry:
            await registry.register(_info("w0", "prefill"))
            assert (await registry.set_status("w0", "draining")).status == "draining"
            assert (await registry.set_role("w0", "decode")).role == "decode"
            record = await registry.heartbeat("w0", Load())
            assert (record.status, record.role) == ("draining", "decode")
            assert [i.instance_id for i, _ in await registry.list_instances("decode")] == ["w0"]
            with pytest.raises(ValueError, match="status must be one of"):
                await registry.set_status("w0", "paused")
            with pytest.raises(InstanceNotFoundError):
                await registry.set_status("nobody", "draining")
    asyncio.run(body())


def test_set_status_keeps_the_ttl(redis_url):
    async def body():
        async with Registry(redis_url, ttl_s=0.3) as registry:
            await registry.register(_info("p0"))
            await registry.set_status("p0", "draining")
            await asyncio.sleep(0.5)
            assert await registry.list_instances() == []
    asyncio.run(body())


def test_instance_info_validation():
    with pytest.raises(ValueError, match="role must be one of"):
        _info("p0", role="router")
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        _info("p0", block_size=0)


def test_heartbeater_registers_beats_and_deregisters(redis_url):
    async def body():
        async with Registry(redis_url, ttl_s=0.6) as registry:
            beater = Heartbeater(registry, _info("d0", "decode"), lambda: Load(num_running=2))
            await beater.start()
            await asyncio.sleep(0.9)  # past the TTL: only heartbeats keep it listed
            [(info, load)] = await registry.list_instances()
            assert (info.instance_id, load.num_running) == ("d0", 2)
            await beater.stop()
            assert await registry.list_instances() == []
    asyncio.run(body())


def test_heartbeater_refuses_to_start_on_mismatch(redis_url):
    async def body():
        async with Registry(redis_url) as registry:
            await registry.register(_info("p0", block_size=16))
            beater = Heartbeater(registry, _info("d0", "decode", block_size=32), Load)
            with pytest.raises(RegistrationError):
                await beater.start()
    asyncio.run(body())


def test_heartbeater_re_registers_after_redis_restart(redis_server):
    async def body():
        async with Registry(redis_server.url, ttl_s=0.6, timeout_s=0.5) as registry:
            async def load():  # an async load function works too
                return Load(num_waiting=4)
            beater = Heartbeater(registry, _info("d0", "decode"), load)
            await beater.start()
            await registry.set_status("d0", "draining")
            await asyncio.sleep(0.3)  # a beat carries the operator's change back to the worker
            assert beater.info.status == "draining"

            redis_server.stop()
            with pytest.raises(RedisError):
                await registry.list_instances()
            await _wait_for(lambda: asyncio.sleep(0, beater.last_error is not None))
            redis_server.start()  # same port, empty

            async def listed():
                try:
                    return [i.instance_id for i, _ in await registry.list_instances()] == ["d0"]
                except RedisError:
                    return False
            await _wait_for(listed)
            await _wait_for(lambda: asyncio.sleep(0, beater.last_error is None))
            assert beater.num_registrations >= 2
            [(info, load_seen)] = await registry.list_instances()
            assert info.status == "draining"  # re-registered with the record it last saw
            assert load_seen is not None and load_seen.num_waiting == 4
            await beater.stop()
    asyncio.run(body())


def test_calls_fail_fast_when_redis_is_down(redis_server):
    async def body():
        async with Registry(redis_server.url, timeout_s=0.5) as registry:
            await registry.register(_info("p0"))
            redis_server.stop()
            started = time.monotonic()
            with pytest.raises(RedisError):
                await registry.heartbeat("p0", Load())
            assert time.monotonic() - started < 3
    asyncio.run(body())


def test_control_plane_modules_are_torch_free():
    """The router never imports torch (STYLE rule 9); checked in a fresh interpreter."""
    code = ("import sys; import pdserve.common.registry, pdserve.common.prefix_index, "
            "pdserve.services.router.bench_index, pdserve.proto, pdserve.proto.pdserve_pb2_grpc, "
            "pdserve.proto.convert; assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
