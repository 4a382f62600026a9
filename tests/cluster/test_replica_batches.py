"""How a replica groups the ASGI messages of a response into Ray stream items."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("ray", reason="ray[serve] is not installed (the cluster extra)")

from cluster.replica import _batches  # noqa: E402

START = {"type": "http.response.start", "status": 200, "headers": []}


def chunk(body: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.response.body", "body": body, "more_body": more}


def batches_of(*waves: list[dict[str, Any] | None]) -> list[list[dict[str, Any]]]:
    """Each wave is queued at once; the next only after the consumer took what it could."""
    async def run() -> list[list[dict[str, Any]]]:
        sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        out: list[list[dict[str, Any]]] = []
        pending = list(waves)

        async def feed() -> None:
            while pending:
                for message in pending.pop(0):
                    sent.put_nowait(message)
                while not sent.empty():
                    await asyncio.sleep(0)

        feeder = asyncio.create_task(feed())
        async for batch in _batches(sent):
            out.append(batch)
        feeder.cancel()         # what is left after the last message is never read
        return out

    return asyncio.run(run())


def test_a_short_response_is_one_item() -> None:
    assert batches_of([START, chunk(b"{}", more=False), None]) == [[START, chunk(b"{}", False)]]


def test_chunks_waiting_together_travel_together_and_the_last_ends_the_stream() -> None:
    got = batches_of([START, chunk(b"a")], [chunk(b"b"), chunk(b"c")],
                     [chunk(b"", more=False), chunk(b"never")])
    assert got == [[START, chunk(b"a")], [chunk(b"b"), chunk(b"c")], [chunk(b"", False)]]


def test_an_app_that_stops_without_its_last_message_ends_the_stream_too() -> None:
    assert batches_of([START, chunk(b"a")], [None]) == [[START, chunk(b"a")]]
    assert batches_of([None]) == []
