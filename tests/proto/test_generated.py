"""The committed stubs match pdserve.proto, import inside the package, and work over a real
grpc.aio channel (Health on both services, a server-streaming Decode, an error status)."""

import asyncio
import subprocess
import sys

import grpc
import pytest

from pdserve.proto import generate
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc


def test_committed_stubs_are_fresh():
    assert generate.check() == [], "run `python -m pdserve.proto.generate`"


def test_check_command_exit_code():
    result = subprocess.run([sys.executable, "-m", "pdserve.proto.generate", "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_check_catches_an_edited_proto(tmp_path, monkeypatch):
    for name in ("pdserve.proto", *generate.GENERATED):
        (tmp_path / name).write_bytes((generate.PROTO_DIR / name).read_bytes())
    proto = tmp_path / "pdserve.proto"
    proto.write_text(proto.read_text().replace("  bool found = 1;", "  bool found = 1;\n  bool extra = 2;"))
    monkeypatch.setattr(generate, "PROTO_DIR", tmp_path)
    monkeypatch.setattr(generate, "PROTO_FILE", tmp_path / "pdserve.proto")
    problems = generate.check()
    assert problems and all("differs from a fresh generation" in p for p in problems)


def test_mask_versions_hides_only_version_lines():
    text = ("# Protobuf Python Version: 7.35.1\n_runtime_version.Domain.PUBLIC,\n    7,\n    35,\n    1,\n"
            "GRPC_GENERATED_VERSION = '1.85.1'\nx = 1\n")
    other = text.replace("7.35.1", "8.0.0").replace("    35,", "    0,").replace("1.85.1", "1.90.0")
    assert generate.mask_versions(text) == generate.mask_versions(other)
    assert generate.mask_versions(text) != generate.mask_versions(other.replace("x = 1", "x = 2"))


def test_stub_imports_from_the_package():
    source = (generate.PROTO_DIR / "pdserve_pb2_grpc.py").read_text()
    assert "from pdserve.proto import pdserve_pb2" in source
    assert pb.DESCRIPTOR.package == "pdserve.v1"


def _health(role: int) -> pb.HealthResponse:
    return pb.HealthResponse(
        instance_id=f"inst-{role}", role=role, model="smollm2", block_size=16, status=pb.SERVING,
        max_model_len=2048, load=pb.Load(num_running=2, num_waiting=1, kv_usage=0.25,
                                         num_free_blocks=75, num_total_blocks=100))


class _Prefill(pb_grpc.PrefillServicer):
    async def Health(self, request, context):
        return _health(pb.ROLE_PREFILL)

    async def Prefill(self, request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt too long")


class _Decode(pb_grpc.DecodeServicer):
    async def Health(self, request, context):
        return _health(pb.ROLE_DECODE)

    async def Decode(self, request, context):
        # Continue each sequence with three tokens after its last one; finish on the last chunk.
        for step in range(1, 4):
            deltas = [pb.SequenceDelta(index=s.index, new_token_ids=[s.output_token_ids[-1] + step])
                      for s in request.sequences]
            if step == 3:
                for delta in deltas:
                    delta.finish_reason = pb.FINISH_REASON_STOP
                    delta.stop_token_id = 2
            chunk = pb.DecodeChunk(request_id=request.request_id, sequences=deltas, finished=step == 3)
            if step == 1:
                computed = 0 if request.HasField("handle") else len(request.prompt_token_ids)
                chunk.num_prompt_tokens_computed = computed
            yield chunk


async def _round_trip():
    server = grpc.aio.server()
    pb_grpc.add_PrefillServicer_to_server(_Prefill(), server)
    pb_grpc.add_DecodeServicer_to_server(_Decode(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            prefill, decode = pb_grpc.PrefillStub(channel), pb_grpc.DecodeStub(channel)
            health = await prefill.Health(pb.HealthRequest(), timeout=5)
            assert (health.role, health.load.num_free_blocks) == (pb.ROLE_PREFILL, 75)
            assert health.status == pb.SERVING
            assert (await decode.Health(pb.HealthRequest(), timeout=5)).role == pb.ROLE_DECODE

            with pytest.raises(grpc.aio.AioRpcError) as error:
                await prefill.Prefill(pb.PrefillRequest(request_id="r0"), timeout=5)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            handle = pb.KVHandle(transfer_address="tcp://127.0.0.1:4000", lease_id="l1", num_tokens=20,
                                 block_size=16, control_address="127.0.0.1:5000", transport="tcp")
            request = pb.DecodeRequest(
                request_id="r1", prompt_token_ids=list(range(20)), handle=handle,
                sequences=[pb.SequenceState(index=0, output_token_ids=[100]),
                           pb.SequenceState(index=1, output_token_ids=[200])])
            chunks = [chunk async for chunk in decode.Decode(request, timeout=5)]
    finally:
        await server.stop(grace=None)
    assert [c.finished for c in chunks] == [False, False, True]
    tokens = {0: [], 1: []}
    for chunk in chunks:
        for delta in chunk.sequences:
            tokens[delta.index].extend(delta.new_token_ids)
    assert tokens == {0: [101, 102, 103], 1: [201, 202, 203]}
    last = chunks[-1].sequences[0]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert (last.WhichOneof("stop_reason"), last.stop_token_id) == ("stop_token_id", 2)


def test_grpc_round_trip():
    asyncio.run(_round_trip())


def test_optional_fields_have_presence():
    params = pb.SamplingParams()
    assert not params.HasField("max_tokens") and not params.HasField("seed")
    params.max_tokens = 0
    assert params.HasField("max_tokens")
    assert not pb.DecodeRequest().HasField("handle")
