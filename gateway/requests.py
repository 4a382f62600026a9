"""What every endpoint does with the incoming request: find the runtime, read the JSON body."""
from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from gateway.protocol import BadRequest, PayloadTooLarge
from gateway.state import Runtime


def runtime(request: Request) -> Runtime:
    """The lifespan's shared state (engine, queue, metrics)."""
    rt: Runtime = request.state.runtime
    return rt


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON: 413 beyond max_bytes, 400 for invalid UTF-8 or JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise PayloadTooLarge(f"the request body exceeds {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"the request body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the request body is not valid UTF-8") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc.msg} at position "
                         f"{exc.pos}") from None


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not valid JSON")
