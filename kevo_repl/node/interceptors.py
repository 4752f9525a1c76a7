"""Unparseable request bodies: INVALID_ARGUMENT naming the method, not UNKNOWN.

grpc.aio turns an exception from a request deserializer into UNKNOWN ("Unexpected <class
'DecodeError'>") and logs a traceback for each one. A body that does not parse is the client's
error and must say so, and a flood of them must not flood the log. `BadRequestInterceptor`
wraps each handler's deserializer so that such a body becomes a marker, which the wrapped
handler refuses with INVALID_ARGUMENT before any of our code sees it.

Only unary requests are wrapped: every RPC of ours takes one request (gRPC reflection's
bidirectional stream is left as it is).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Unparseable:
    __slots__ = ("detail",)

    def __init__(self, detail: str) -> None:
        self.detail = detail


class BadRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = _tolerant(handler.request_deserializer, details.method)
        if handler.unary_unary is not None:
            return handler._replace(
                request_deserializer=parse, unary_unary=_unary(handler.unary_unary)
            )
        if handler.unary_stream is not None:
            return handler._replace(
                request_deserializer=parse, unary_stream=_stream(handler.unary_stream)
            )
        return handler


def _tolerant(parse: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    def tolerant(body: bytes) -> Any:
        try:
            return parse(body)
        except DecodeError as err:
            return _Unparseable(f"{method}: the request body is not a valid message: {err}")

    return tolerant


def _unary(behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def refuse_or_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Unparseable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail)
        return await behaviour(request, context)

    return refuse_or_call


def _stream(behaviour: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
    async def refuse_or_stream(
        request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        if isinstance(request, _Unparseable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail)
        result = behaviour(request, context)
        if inspect.isasyncgen(result):
            async for response in result:
                yield response
        else:  # a handler that writes with context.write and returns
            await result

    return refuse_or_stream
