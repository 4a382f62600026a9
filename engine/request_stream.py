"""The consumer side of one request in `AsyncEngine`: deltas merged per sequence while the
client lags, so the engine never waits on a slow consumer."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from engine.types import RequestError, TokenDelta

if TYPE_CHECKING:
    from engine.engine import AsyncEngine


class RequestStream:
    """The consumer side of one request: merges deltas per sequence while the client lags, so
    the engine never waits on a slow consumer."""

    def __init__(self, request_id: str, n: int, engine: AsyncEngine) -> None:
        self.request_id = request_id
        self._engine = engine
        self._pending: dict[int, TokenDelta] = {}
        self._ready = asyncio.Event()
        self._num_unfinished = n
        self.finished = False
        self._ready_future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ready_future.set_result(None)

    async def ready(self) -> None:
        """Wait until the request is queued in the engine (its grammar compiled); raises
        RequestError if it never will be (a grammar that fails to compile or times out)."""
        await asyncio.shield(self._ready_future)

    def _fail(self, error: RequestError) -> None:
        self._ready_future.set_exception(error)
        self._num_unfinished = 0
        self._ready.set()

    def put(self, delta: TokenDelta) -> None:
        prev = self._pending.get(delta.index)
        self._pending[delta.index] = prev.merge(delta) if prev else delta
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenDelta:
        while not self._pending:
            if self._ready_future.done() and self._ready_future.exception() is not None:
                raise self._ready_future.exception()  # type: ignore[misc]
            if self._num_unfinished == 0:
                self.finished = True
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        index = next(iter(self._pending))
        delta = self._pending.pop(index)
        if delta.finish_reason is not None:
            self._num_unfinished -= 1
        return delta

    async def aclose(self) -> None:
        """Stop consuming; aborts the request if it is still running."""
        self._engine.abort(self.request_id)
