"""The control plane is authenticated: the router's admin routes follow --api-key (and take
changes from loopback only without one), and with --internal-token every gRPC call between
router and workers must carry the token (real processes)."""

from __future__ import annotations

import asyncio
import socket

import grpc
import httpx
import openai
import pytest
from stack import Stack

from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.services import grpc_auth

TOKEN = "fleet-secret"


@pytest.fixture(scope="module")
def stack(tiny_models):
    s = Stack(tiny_models["llama"], prefill=[["--internal-token", TOKEN]], decode=[["--internal-token", TOKEN]],
              router_flags=("--disagg-min-prompt-tokens", "0", "--internal-token", TOKEN, "--api-key", "k1"))
    yield s
    s.close()


def test_requests_flow_with_the_token(stack):
    c = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="k1", max_retries=0, timeout=60)
    out = c.completions.create(model="tiny", prompt="The weather today is", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.base_url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_grpc_calls_without_the_token_are_refused(stack):
    grpc_address = stack.ready_addresses("prefill-0")[0]

    async def call(token):
        async with grpc_auth.channel(grpc_address, token) as ch:
            return await pb_grpc.PrefillStub(ch).Health(pb.HealthRequest(), timeout=5)
    assert asyncio.run(call(TOKEN)).instance_id == "prefill-0"
    for token in (None, "guess"):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            asyncio.run(call(token))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

    async def decode_stream():
        async with grpc_auth.channel(stack.ready_addresses("decode-0")[0], None) as ch:
            async for _ in pb_grpc.DecodeStub(ch).Decode(pb.DecodeRequest(request_id="x", prompt_token_ids=[1])):
                pass
    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(decode_stream())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_every_admin_route_needs_the_api_key(stack):
    routes = [("GET", "/admin/stats"), ("GET", "/admin/instances"), ("POST", "/admin/instances/decode-0/drain"),
              ("POST", "/admin/instances/decode-0/resume"), ("POST", "/admin/instances/decode-0/role")]
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        for method, path in routes:
            assert http.request(method, path).status_code == 401, path
            assert http.request(method, path, headers={"Authorization": "Bearer nope"}).status_code == 401, path
        ok = {"Authorization": "Bearer k1"}
        assert http.get("/admin/stats", headers=ok).status_code == 200
        assert http.get("/admin/instances", headers=ok).status_code == 200
        assert http.post("/admin/instances/decode-0/resume", headers=ok).status_code == 200
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200  # stay open


def _outward_ip() -> str:
    """This machine's address on its default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def test_without_a_key_admin_changes_come_from_loopback_only(tiny_models):
    s = Stack(tiny_models["llama"], prefill=[[]], decode=[[]], router_flags=("--host", "0.0.0.0"))
    try:
        ip = _outward_ip()
        if ip.startswith("127."):
            pytest.skip("this machine has no address but loopback")
        remote = f"http://{ip}:{s.port}"
        with httpx.Client(timeout=30) as http:
            assert http.get(remote + "/admin/stats").status_code == 200  # reads stay open
            assert http.post(remote + "/admin/instances/decode-0/drain").status_code == 403
            assert http.post(s.base_url + "/admin/instances/decode-0/drain").status_code == 200
            assert http.post(s.base_url + "/admin/instances/decode-0/resume").status_code == 200
    finally:
        s.close()
