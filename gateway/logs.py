"""structlog setup and the request-context middleware.

The middleware binds `request_id` (the client's `X-Request-Id` when it is sane, else a fresh
one), echoes it as a response header, and writes the one summary line per request when the
response ends; routes add their fields (tokens, ttft, finish reason) to `scope["plumbline.log"]`.
"""
from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from gateway.metrics import Metrics

log = structlog.get_logger("plumbline.gateway")

LOG_FIELDS = "plumbline.log"      # scope key: dict of fields for the summary line
RESPONSE_HEADERS = "plumbline.headers"   # scope key: extra response headers (response_headers)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_QUIET_PATHS = {"/health", "/ready", "/metrics"}   # logged at debug: probes run every few seconds


def configure(json: bool | None = None, level: str = "info") -> None:
    """Once per process: JSON lines off a terminal, console output on one."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (structlog.processors.JSONRenderer() if json
                     else structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def log_fields(scope: Scope) -> dict[str, Any]:
    fields: dict[str, Any] = scope.setdefault(LOG_FIELDS, {})
    return fields


def response_headers(scope: Scope) -> dict[str, str]:
    """Headers a route wants on its response, whichever response class sends it (the SSE and
    deferred JSON responses start long after the route returns); ASCII values only."""
    headers: dict[str, str] = scope.setdefault(RESPONSE_HEADERS, {})
    return headers


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                request_id = candidate if _REQUEST_ID.match(candidate) else None
        request_id = request_id or uuid.uuid4().hex
        scope[LOG_FIELDS] = {}
        status = 500
        start = time.monotonic()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode()),
                                      *[(k.encode(), v.encode("ascii")) for k, v in
                                        scope.get(RESPONSE_HEADERS, {}).items()]]
            await send(message)

        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope["path"]
            route = path if path in _ROUTES else "other"
            self.metrics.http_requests.labels(route, str(status)).inc()
            level = log.debug if path in _QUIET_PATHS else log.info
            level("request_finished", method=scope["method"], path=path, status=status,
                  duration_ms=round((time.monotonic() - start) * 1000, 1), **scope[LOG_FIELDS])
            structlog.contextvars.clear_contextvars()


_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize",
           "/health", "/ready",
           "/metrics", "/openapi.json"}
