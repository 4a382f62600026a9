"""One engine replica: the gateway's own Starlette app (`create_app`) and its engine, in a Ray
Serve replica. The ingress hands each request over as an ASGI scope and its body; the app
runs exactly as in one process (auth, errors, SSE, every route) and the ASGI messages it
sends stream back, the response start carrying `x-plumbline-replica`.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog

from cluster.routing import RoutingHints
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.state import Runtime

log = structlog.get_logger("plumbline.cluster")

REPLICA_HEADER = b"x-plumbline-replica"
_LOAD_TIMEOUT_S = 600.0


class EngineReplica:
    async def __init__(self, config: GatewayConfig) -> None:
        from ray import serve

        self.replica_id: str = serve.get_replica_context().replica_id.unique_id
        structlog.contextvars.bind_contextvars(replica=self.replica_id)
        self.app = create_app(config)
        self.runtime: Runtime = self.app.state.runtime
        self._lifespan = self.app.router.lifespan_context(self.app)
        self._state: dict[str, Any] = dict(await self._lifespan.__aenter__() or {})
        # Ready only once the model is loaded: Ray sends nothing to a replica before then.
        deadline = time.monotonic() + _LOAD_TIMEOUT_S
        while self.runtime.engine is None:
            if self.runtime.load_error is not None:
                raise RuntimeError(f"the model failed to load: {self.runtime.load_error}")
            assert time.monotonic() < deadline, "the model did not load in time"
            await asyncio.sleep(0.05)
        log.info("replica_ready", replica=self.replica_id)

    async def forward(self, hints: RoutingHints, scope: dict[str, Any],
                      body: bytes) -> AsyncIterator[list[dict[str, Any]]]:
        """Run one HTTP request through the app; yield the ASGI messages it sends, in lists
        (see `_batches`). Closing the generator (the client left, the ingress gave up) is a
        disconnect for the app."""
        sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        left = asyncio.Event()
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (REPLICA_HEADER, self.replica_id.encode())]}
            await sent.put(message)

        async def run() -> None:
            try:
                await self.app({**scope, "state": dict(self._state)}, receive, send)
            except Exception:   # as uvicorn: the app already answered 500; log, don't re-raise
                log.exception("asgi_app_failed")
            finally:
                await sent.put(None)

        task = asyncio.create_task(run())
        try:
            async for batch in _batches(sent):
                yield batch
        finally:
            left.set()
            await asyncio.shield(task)

    async def check_health(self) -> None:
        """Ray's health check: a replica whose engine failed is restarted."""
        if self.runtime.load_error is not None:
            raise RuntimeError(self.runtime.load_error)

    async def __del__(self) -> None:
        await self._lifespan.__aexit__(None, None, None)


async def _batches(sent: asyncio.Queue[dict[str, Any] | None]) -> AsyncIterator[list[dict[str, Any]]]:
    """The messages as they come, each time all that are waiting, up to the response's last.

    Each item of a Ray stream is a report from replica to caller; one per list rather than
    one per message puts the start and body of a short response in one item, and the SSE
    chunks that queued up while the ingress was busy in the next."""
    while True:
        batch = [await sent.get()]
        while batch[-1] is not None and not _is_last(batch[-1]) and not sent.empty():
            batch.append(sent.get_nowait())
        last = batch[-1]
        if last is None:                    # the app returned without finishing its response
            batch.pop()
        if batch:
            yield batch
        if last is None or _is_last(last):
            return


def _is_last(message: dict[str, Any]) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body")
