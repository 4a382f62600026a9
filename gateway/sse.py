"""Server-sent events and disconnect-aware responses (the shape of sse-starlette, our own code).

`EventStreamResponse` runs three things at once: a producer task iterating the events, a
listener on `receive()` that cancels everything on `http.disconnect` (a stream waiting for its
next token still notices that the client left), and the sender, which writes `: ping` comments
whenever nothing else went out for `ping_interval` seconds (e.g. while queued). The producer
hands frames over through a small memory stream, so the ping timeout never cancels the
producer mid-step. `DeferredJSONResponse` gives non-streaming requests the same disconnect
listener. Both call `on_close` in a `finally`, whatever happened.
"""
from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anyio
import structlog
from starlette.types import Receive, Scope, Send

from gateway.protocol import APIError, internal_error

log = structlog.get_logger("plumbline.gateway")

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def frame(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def error_frame(exc: APIError) -> bytes:
    return frame(exc.body())


async def _wait_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


class EventStreamResponse:
    def __init__(self, events: AsyncGenerator[bytes, None], *, ping_interval: float,
                 on_close: Callable[[], None], headers: dict[str, str] | None = None) -> None:
        self.events = events
        self.ping_interval = ping_interval
        self.on_close = on_close
        self.headers = headers or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                   (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
                   *[(k.lower().encode(), v.encode()) for k, v in self.headers.items()]]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            tx, rx = anyio.create_memory_object_stream[bytes](max_buffer_size=8)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_wait_disconnect, receive, tg.cancel_scope)
                tg.start_soon(self._produce, tx)
                async with rx:
                    while True:
                        chunk: bytes | None = PING     # unless a frame comes within the interval
                        with anyio.move_on_after(self.ping_interval):
                            try:
                                chunk = await rx.receive()
                            except anyio.EndOfStream:
                                chunk = None
                        if chunk is None:
                            break
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        finally:
            self.on_close()

    async def _produce(self, tx: anyio.abc.ObjectSendStream[bytes]) -> None:
        async with tx:
            try:
                async for chunk in self.events:
                    await tx.send(chunk)
            except APIError as exc:      # after the stream started: one error event, then [DONE]
                await tx.send(error_frame(exc))
                await tx.send(DONE)
            except Exception:
                log.exception("stream_failed")
                await tx.send(error_frame(internal_error()))
                await tx.send(DONE)
            finally:
                with anyio.CancelScope(shield=True):
                    await self.events.aclose()


class DeferredJSONResponse:
    """Computes its body while watching for a disconnect; a 4xx/5xx if the computation raises."""

    def __init__(self, compute: Callable[[], Awaitable[dict[str, Any]]], *,
                 on_close: Callable[[], None]) -> None:
        self.compute = compute
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body: dict[str, Any] | None = None
        status, headers = 200, {}
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_wait_disconnect, receive, tg.cancel_scope)
                try:
                    body = await self.compute()
                except APIError as exc:
                    status, body, headers = exc.status, exc.body(), exc.headers
                except Exception:
                    log.exception("request_failed")
                    failure = internal_error()
                    status, body = failure.status, failure.body()
                tg.cancel_scope.cancel()
        finally:
            self.on_close()
        if body is None:          # the client left; nobody to answer
            return
        await send_json(send, status, body, headers)


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: dict[str, str] | None = None) -> None:
    payload = dumps(body)
    raw = [(b"content-type", b"application/json"),
           (b"content-length", str(len(payload)).encode()),
           *[(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
