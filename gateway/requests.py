"""What every endpoint does with the incoming request: find the runtime, read the JSON body,
parse it and judge the fields the models do not declare."""
from __future__ import annotations

import json
from typing import Any, TypeVar
from urllib.parse import quote

import structlog
from pydantic import BaseModel
from starlette.requests import Request

from gateway.fields import judge_fields
from gateway.logs import log_fields, response_headers
from gateway.protocol import BadRequest, PayloadTooLarge, parse
from gateway.state import Runtime

log = structlog.get_logger("plumbline.gateway")
_M = TypeVar("_M", bound=BaseModel)
_MAX_HEADER_NAMES = 32     # unknown fields named in the header and the log
_MAX_NAME_CHARS = 64       # each name cut to this many characters there


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


async def parse_request(request: Request, rt: Runtime, model: type[_M]) -> _M:
    """The body parsed into `model`; unknown fields are logged and listed in the
    x-plumbline-ignored header (a 400 with --strict-fields), refused ones are a 400."""
    req = parse(model, await read_json(request, rt.config.max_body_bytes))
    note_fields(request, rt, req)
    return req


def note_fields(request: Request, rt: Runtime, req: BaseModel) -> None:
    """Judge the fields `req`'s model does not declare (gateway/fields.py)."""
    unknown = judge_fields(req, strict=rt.config.strict_fields)
    if unknown:
        # a body may hold thousands of keys, or one of megabytes: the log line and the header
        # stay short
        shown = [name if len(name) <= _MAX_NAME_CHARS else name[:_MAX_NAME_CHARS - 3] + "..."
                 for name in unknown[:_MAX_HEADER_NAMES]]
        log.warning("request_fields_ignored", fields=shown, num_fields=len(unknown))
        log_fields(request.scope)["ignored_fields"] = ",".join(shown)
        # a JSON key may hold any character; percent-encoding keeps the header one ASCII line
        response_headers(request.scope)["x-plumbline-ignored"] = ",".join(
            quote(name, safe="") for name in shown)
