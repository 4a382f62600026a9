"""`create_app(config)`: routes, pure-ASGI middleware, and a lifespan that loads the engine.

The model loads in a worker thread after the lifespan has yielded, so /health answers and /ready
says 503 while it loads. `begin_drain` (SIGTERM) refuses new requests, lets running ones finish
for `drain_timeout_s`, then aborts what is left; each aborted stream ends with an error event.
"""
from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from engine import AsyncEngine, EngineClient, EngineConfig
from gateway import admin, routes, tokenization
from gateway.admission import Admission
from gateway.config import GatewayConfig
from gateway.guard import InMemorySessionStore, TraceRing, get_trace
from gateway.logs import RequestContextMiddleware
from gateway.metrics import Metrics
from gateway.openapi import openapi_schema
from gateway.protocol import (APIError, BadRequest, MethodNotAllowed, NotFound, Unauthorized,
                              internal_error)
from gateway.sse import send_json
from gateway.state import Runtime
from gateway.tokens import TokenTable
from gateway.ui import PREFIX as UI_PREFIX
from gateway.ui import console_routes

log = structlog.get_logger("plumbline.gateway")

EngineFactory = Callable[[EngineConfig], EngineClient]
_OPEN_PATHS = ("/health", "/ready", "/metrics", "/openapi.json")
_TRACES_PREFIX = "/v1/traces/"


class AuthMiddleware:
    """Bearer API keys on everything but the probes, metrics and the schema; /v1/admin/ checks
    its own key (gateway/admin.py). The caller's identity goes on the request state for the
    traces: `trace_owner` (the matching key's owner id, None without keys) and `is_admin`
    (the admin key, which also opens /v1/traces/ where API keys are required)."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], admin_key: str = "",
                 owner_of: Callable[[bytes], str] | None = None) -> None:
        self.app = app
        self.api_keys = [k.encode() for k in api_keys]
        self.admin_key = admin_key.encode()
        # owner ids computed once: a request costs no HMAC, only the comparisons
        self.owners = [owner_of(k) if owner_of is not None else "" for k in self.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or path in _OPEN_PATHS or path.startswith(admin.ADMIN_PREFIX)
                or path == UI_PREFIX or path.startswith(UI_PREFIX + "/")):  # pages hold no data
            await self.app(scope, receive, send)
            return
        token = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                token = value[7:].strip()
        # compare with every key, always: the time taken says nothing about which key is close
        matches = [hmac.compare_digest(token, key) for key in self.api_keys]
        is_admin = bool(self.admin_key) and hmac.compare_digest(token, self.admin_key)
        if self.api_keys and not any(matches) and not (
                is_admin and scope["path"].startswith(_TRACES_PREFIX)):
            exc = Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>'")
            await send_json(send, exc.status, exc.body(), {"WWW-Authenticate": "Bearer"})
            return
        state = scope.setdefault("state", {})
        state["trace_owner"] = self.owners[matches.index(True)] if any(matches) else None
        state["is_admin"] = is_admin
        await self.app(scope, receive, send)


def create_app(config: GatewayConfig, engine_factory: EngineFactory | None = None) -> Starlette:
    factory: EngineFactory = engine_factory or AsyncEngine
    metrics = Metrics(config.model_name)
    # Traces off (no API key, no --traces): the ring keeps nothing and writes no file.
    shared = None
    if config.session_store:     # replicas share session facts and traces (guard/redis_store.py)
        from gateway.guard.redis_store import open_shared_state
        shared = open_shared_state(config.session_store, config.session_ttl_s)
    traces = (TraceRing(config.max_traces, config.trace_dir, config.trace_withheld,
                        shared=None if shared is None else shared.traces,
                        secret=None if shared is None else shared.trace_secret)
              if config.traces_enabled else TraceRing(0))
    if config.trace_dir is not None and not config.traces_enabled:
        log.warning("traces_off", reason="no --api-key and no --traces", trace_dir=config.trace_dir)
    runtime = Runtime(config, metrics, policy=config.guard_policy(),
                      sessions=shared.sessions if shared is not None
                      else InMemorySessionStore(ttl_s=config.session_ttl_s), traces=traces)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        loading = asyncio.create_task(_load(runtime, factory), name="plumbline-load")
        try:
            yield {"runtime": runtime}
        finally:
            runtime.is_draining = True
            loading.cancel()
            if runtime.engine is not None:
                await runtime.engine.shutdown()
            if shared is not None:
                await shared.aclose()
            log.info("server_stopped")

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_schema(config.model_name))

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/v1/completions", routes.completions, methods=["POST"]),
            Route("/v1/models", routes.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", routes.get_model, methods=["GET"]),
            Route("/tokenize", tokenization.tokenize, methods=["POST"]),
            Route("/detokenize", tokenization.detokenize, methods=["POST"]),
            Route("/v1/server_info", admin.server_info, methods=["GET"]),
            Route("/v1/admin/weights", admin.update_weights, methods=["POST"]),
            Route("/v1/traces/{request_id}", get_trace, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/ready", routes.ready, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            *console_routes(with_pages=config.ui),
        ],
        middleware=[Middleware(RequestContextMiddleware, metrics=metrics),
                    Middleware(AuthMiddleware, api_keys=config.api_keys,
                               admin_key=config.admin_key, owner_of=traces.owner_of)],
        exception_handlers={APIError: _api_error, HTTPException: _http_error,
                            Exception: _unexpected_error},
        lifespan=lifespan,
    )
    app.state.runtime = runtime    # for the CLI's signal handler and for tests
    return app


async def _load(rt: Runtime, factory: EngineFactory) -> None:
    log.info("model_loading", model=rt.config.engine.model)
    try:
        engine = await anyio.to_thread.run_sync(factory, rt.config.engine)
        await engine.start()
    except Exception as exc:
        rt.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("model_load_failed", model=rt.config.engine.model)
        return
    rt.admission = Admission(engine.limits.max_num_seqs, rt.config.max_queued_requests,
                             rt.config.retry_after_s)
    rt.token_table = TokenTable(engine.tokenizer)
    rt.engine = engine
    log.info("model_loaded", model=rt.config.model_name, max_model_len=rt.max_model_len)


def begin_drain(rt: Runtime) -> asyncio.Task[None] | None:
    """SIGTERM: refuse new requests now; abort whatever still runs after the grace period."""
    if rt.is_draining:
        return None
    rt.is_draining = True
    if rt.admission is not None:
        rt.admission.close()
    log.info("drain_started", num_active=len(rt.active), grace_s=rt.config.drain_timeout_s)
    return asyncio.get_running_loop().create_task(_drain(rt))


async def _drain(rt: Runtime) -> None:
    with anyio.move_on_after(rt.config.drain_timeout_s):
        while rt.active or (rt.admission is not None and rt.admission.num_in_use):
            await asyncio.sleep(0.05)
        return
    if rt.admission is not None:
        rt.admission.fail_waiting()
    if rt.engine is not None:
        for request_id in list(rt.active):
            rt.engine.abort(request_id)
    log.warning("drain_timed_out", num_aborted=len(rt.active))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err: APIError
    if exc.status_code == 404:
        err = NotFound(f"no route {request.url.path}")
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        err = BadRequest(str(exc.detail))
        err.status = exc.status_code
    # Starlette's 405 names the route's methods in Allow, which RFC 9110 requires
    return JSONResponse(err.body(), err.status, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled_exception", exc_info=exc)
    err = internal_error()
    return JSONResponse(err.body(), err.status)
