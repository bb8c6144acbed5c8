"""OpenAI error bodies, JSON responses and request parsing of the HTTP front end (torch-free):
shared by app.py and responses.py without an import cycle between them."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from pdserve.common.engine_client import EngineDeadError
from pdserve.common.sampling_params import ParameterError
from pdserve.services.router import openai_schema as oa


class APIError(Exception):
    """Becomes OpenAI's error body {"error": {message, type, param, code}} with this status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> oa.ErrorResponse:
        return oa.ErrorResponse(error=oa.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                   code=self.code))

    def response(self) -> Response:
        response = _json(self.body(), self.status)
        if self.status in (429, 503):  # overloaded or no instance: worth retrying soon
            response.headers["Retry-After"] = "1"
        return response


def as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ParameterError):
        return APIError(400, str(e), param=e.param)
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), type="server_error", code="engine_unavailable")
    if isinstance(e, ClientDisconnect):  # the client left while sending its body: nothing failed here
        return APIError(499, "the client disconnected before sending its whole request")
    return APIError(500, f"internal error: {e}", type="server_error")


class InternalErrors:
    """ASGI middleware: an exception no handler took (a bug, or a fault below) becomes OpenAI's
    error body with 500 (503 for EngineDeadError) through `on_error`, and the connection stays
    open. Starlette sends a handler registered for `Exception` from its outermost middleware and
    then raises again, so uvicorn closed the keep-alive connection and the client's next request
    on it failed. Once a response has started nothing can be sent: the error goes up as before."""

    def __init__(self, app, on_error):
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:
            if started:
                raise
            response = await self.on_error(Request(scope, receive), e)
            await response(scope, receive, send)


def _json(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _json_obj(obj: dict, status: int = 200) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), status_code=status, media_type="application/json")


async def _parse(request: Request, model: type[BaseModel], max_bytes: int):
    body = await _read_body(request, max_bytes)
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {err['msg']}") from None
        param = _param_name(err["loc"])
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused (413) once it passes max_bytes: a huge body is never held whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {max_bytes} "
                            "(--max-request-body-bytes)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"the request body exceeds the limit of {max_bytes} bytes (--max-request-body-bytes)",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _param_name(loc: tuple) -> str | None:
    """('messages', 0, 'content', 'str') -> 'messages[0].content' (union member tags dropped)."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "dict", "list", "none"):
            name += f".{part}" if name else part
        else:
            break
    return name or None


