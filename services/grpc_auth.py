"""A shared secret between the router and the workers on every gRPC call (`--internal-token`).

    router / decode worker (client)                          worker (server)
    channel interceptor adds `x-pdserve-token: TOKEN`  -->   server interceptor: a call without
                                                             the token is UNAUTHENTICATED

Without a token configured on the server every call is accepted (the default, for a stack on
one machine whose internal ports listen on loopback only). Torch-free (the router uses it).
"""

from __future__ import annotations

import hmac

import grpc

HEADER = "x-pdserve-token"


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
    """An insecure channel (the fleet's network is private) that sends the token on every call."""
    return grpc.aio.insecure_channel(address, options=list(options),
                                     interceptors=[_AddTokenUnary(token), _AddTokenStream(token), _AddTokenBidi(token)]
                                     if token else None)
