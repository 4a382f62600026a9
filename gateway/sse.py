"""Server-sent events and disconnect-aware responses (the shape of sse-starlette, our own code).

`EventStreamResponse` runs three things at once: the stream itself, which iterates the events and
writes each frame as it comes; a listener on `receive()` that cancels everything on
`http.disconnect` (a stream waiting for its next token still notices that the client left); and a
pinger, which writes a `: ping` comment whenever nothing went out for `ping_interval` seconds
(e.g. while queued). No timeout wraps the stream, so a ping never cancels it mid-step. Frames go
out from the task that makes them: at 32 streams the event loop's work per token competes with
the model step for the CPUs and the GIL, and a hand-over between two tasks (a memory stream, a
cancel scope per frame) was a third of it. `DeferredJSONResponse` gives non-streaming requests
the same disconnect listener. Both call `on_close` in a `finally`, whatever happened.
"""
from __future__ import annotations

import json
import time
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
        self._last_sent = time.monotonic()
        self._done = False           # the last body went out: no ping after it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                   (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
                   *[(k.lower().encode(), v.encode()) for k, v in self.headers.items()]]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async with anyio.create_task_group() as tg:
                tg.start_soon(_wait_disconnect, receive, tg.cancel_scope)
                tg.start_soon(self._ping, send)
                await self._stream(send)
                self._done = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        finally:
            self.on_close()

    async def _body(self, send: Send, chunk: bytes) -> None:
        self._last_sent = time.monotonic()
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _stream(self, send: Send) -> None:
        # The events are pulled one by one so that an error raised by `send` (the client's
        # socket) is not taken for the generator's, which becomes an error event.
        try:
            while True:
                try:
                    chunk = await anext(self.events)
                except StopAsyncIteration:
                    return
                except APIError as exc:   # after the stream started: one error event, then [DONE]
                    await self._body(send, error_frame(exc) + DONE)
                    return
                except Exception:
                    log.exception("stream_failed")
                    await self._body(send, error_frame(internal_error()) + DONE)
                    return
                await self._body(send, chunk)
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()

    async def _ping(self, send: Send) -> None:
        while True:
            await anyio.sleep(max(0.0, self._last_sent + self.ping_interval - time.monotonic()))
            if self._done:
                return
            if time.monotonic() - self._last_sent >= self.ping_interval:
                await self._body(send, PING)


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
