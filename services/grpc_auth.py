"""A shared secret between the router and the workers on every gRPC call (`--internal-token`).

    router / decode worker (client)                          worker (server)
    channel interceptor adds `x-pdserve-token: TOKEN`  -->   server interceptor: a call without
                                                             the token is UNAUTHENTICATED

Without a token configured on the server every call is accepted (the default, for a stack on
one machine whose internal ports listen on loopback only).

Keepalive: every channel pings its server every KEEPALIVE_S while it has calls open and drops the
connection when a ping is not answered within KEEPALIVE_TIMEOUT_S, so a frozen worker (SIGSTOP, a
paused VM, a partition that sends no reset) fails its calls with UNAVAILABLE within ~10 s, which
the router's resubmission handles like a dead one, instead of hanging them until their deadline
(600 s for a decode). The servers accept such pings (`SERVER_OPTIONS`; gRPC's default would answer
a ping every 5 s without data with GOAWAY "too_many_pings"). Torch-free (the router uses it).
"""

from __future__ import annotations

import hmac

import grpc

HEADER = "x-pdserve-token"
KEEPALIVE_S = 5.0
KEEPALIVE_TIMEOUT_S = 5.0
CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
                   ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
                   # the ping's own deadline, which grpc 1.85 applies instead of the keepalive
                   # timeout (default 60 s: a frozen peer was dropped after 65 s without it)
                   ("grpc.http2.ping_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
                   ("grpc.http2.max_pings_without_data", 0)]  # 0: keep pinging an idle stream
SERVER_OPTIONS = [("grpc.http2.min_recv_ping_interval_without_data_ms", int(KEEPALIVE_S * 1000) // 2),
                  ("grpc.http2.max_ping_strikes", 0)]


class ServerTokenCheck(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self.expected = token.encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong {HEADER}: see --internal-token")
        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong {HEADER}: see --internal-token")
            yield  # pragma: no cover (an async generator that only aborts)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny_stream)
        self._deny_bidi = grpc.stream_stream_rpc_method_handler(deny_stream)

    async def intercept_service(self, continuation, handler_call_details):
        got = dict(handler_call_details.invocation_metadata or ()).get(HEADER, "")
        if hmac.compare_digest(got.encode(), self.expected):
            return await continuation(handler_call_details)
        method = handler_call_details.method
        if method.endswith("/DecodeStream"):
            return self._deny_bidi
        return self._deny_stream if method.endswith("/Decode") else self._deny_unary


class _TokenDetails:
    def __init__(self, token: str):
        self.token = token

    def _details(self, details):
        metadata = list(details.metadata or ()) + [(HEADER, self.token)]
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


# grpc.aio files each interceptor under ONE call kind (the first it is an instance of): one class each.
class _AddTokenUnary(_TokenDetails, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AddTokenStream(_TokenDetails, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AddTokenBidi(_TokenDetails, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def server_interceptors(token: str | None) -> list:
    return [ServerTokenCheck(token)] if token else []


def channel(address: str, token: str | None, options=()) -> grpc.aio.Channel:
    """An insecure channel (the fleet's network is private) that sends the token on every call and
    keeps its connection alive (module docstring)."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS + list(options),
                                     interceptors=[_AddTokenUnary(token), _AddTokenStream(token), _AddTokenBidi(token)]
                                     if token else None)
