"""The ingress deployment: Ray's HTTP proxy hands it every request; it reads the body for the
routing hints (`routing.py`) and passes scope and body to an engine replica through Ray
Serve's handle, then relays the replica's ASGI messages to the client as they come.

What only the ingress can do, it does here: a 429 from a replica is retried on another
replica (the client sees it when every replica refused); a replica that dies before its
response starts is a 503, after it started an SSE error event and `[DONE]`;
`POST /v1/admin/weights` goes to every replica and reports each one's version; `GET
/metrics` merges every replica's metrics under a `replica` label.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from starlette.types import Receive, Scope, Send

from cluster import routing
from cluster.metrics import merge_metrics
from cluster.replica import REPLICA_HEADER
from cluster.routing import RoutingHints, hints_for
from gateway.config import GatewayConfig
from gateway.protocol import APIError, PayloadTooLarge, Unavailable
from gateway.sse import DONE, error_frame, send_json

log = structlog.get_logger("plumbline.cluster")

_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path",
               "query_string", "root_path", "headers", "client", "server")
Reply = tuple[int, dict[bytes, bytes], bytes]


class Ingress:
    """Serves HTTP in one of two places: in the `plumbline serve --replicas` process itself
    (uvicorn, `cluster.app.serve_cluster`: one Ray hop per request), or as a Serve deployment
    behind Ray's HTTP proxy (`serve run` config files, KubeRay: one proxy per node, two hops)."""

    def __init__(self, engine: Any, config: GatewayConfig, behind_ray_proxy: bool = True) -> None:
        self.engine = engine.options(stream=True)   # a DeploymentHandle to EngineReplica
        self.config = config
        self.behind_ray_proxy = behind_ray_proxy

    def __serve_build_asgi_app__(self) -> Any:      # Ray Serve's late-bound ASGI ingress
        return _App(self)

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        try:
            body = await self._read_body(receive)
            wire = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
            if scope["method"] == "POST" and scope["path"] == "/v1/admin/weights":
                await self._weights(wire, body, send)
            elif scope["method"] == "GET" and scope["path"] == "/metrics":
                text = merge_metrics({rid: reply[2].decode() for rid, reply in
                                      (await self._everywhere(wire, body)).items()})
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]})
                await send({"type": "http.response.body", "body": text.encode()})
            else:
                await self._forward(wire, body, receive, send)
        except APIError as exc:
            await send_json(send, exc.status, exc.body(), exc.headers)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.config.max_body_bytes:
                raise PayloadTooLarge(f"the request body exceeds {self.config.max_body_bytes} "
                                      "bytes")
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _forward(self, wire: dict[str, Any], body: bytes, receive: Receive,
                       send: Send) -> None:
        try:
            hints = hints_for(json.loads(body)) if body else RoutingHints()
        except ValueError:
            hints = RoutingHints()       # the replica answers the 400
        refused: set[str] = set()
        num_failed = 0
        while True:
            gen = self.engine.forward.remote(
                RoutingHints(hints.session_id, hints.prefix_key, frozenset(refused)), wire, body)
            try:
                start, *rest = await gen.__anext__()     # replicas send lists of messages
            except Exception as exc:
                # Died before answering (nothing reached the client): once more, elsewhere if
                # Ray already knows it died. Only a non-streamed response can have saved its
                # session facts before that; the retry then sees them as earlier facts.
                log.warning("replica_failed_before_response", error=repr(exc))
                num_failed += 1
                if num_failed < 2:
                    continue
                raise Unavailable("the replica serving this request failed; retry",
                                  code="replica_failed") from None
            replica = dict(start["headers"]).get(REPLICA_HEADER, b"").decode()
            if start["status"] != 429 or len(refused) + 1 >= len(routing.live_replicas()):
                break
            refused.add(replica)          # backpressure: try a replica with room
            gen.cancel()
        is_sse = dict(start["headers"]).get(b"content-type", b"").startswith(b"text/event-stream")
        if self.behind_ray_proxy:
            # Ray's proxy gave the request its X-Request-Id (the app used it) and adds it to the
            # response itself: once is enough.
            start = {**start, "headers": [(k, v) for k, v in start["headers"]
                                          if k != b"x-request-id"]}
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, gen))
        ended = False
        try:
            await send(start)
            batch: list[dict[str, Any]] | None = rest
            while batch is not None:
                for message in batch:
                    await send(message)
                    ended = message["type"] == "http.response.body" and not message.get("more_body")
                # After the last message the client has it all: not waiting for the replica's
                # generator to close lets the proxy end this request before the next comes.
                batch = None if ended else await anext(gen, None)
        except Exception as exc:
            if watcher.done():       # the client left (e.g. after [DONE]) and the watcher
                return               # cancelled the replica's side: nobody to tell
            # the replica died mid-response (Ray restarts it)
            log.warning("replica_failed_mid_response", replica=replica, error=repr(exc))
            if is_sse:
                await send({"type": "http.response.body", "more_body": True, "body": error_frame(
                    Unavailable(f"replica {replica} failed mid-stream; retry",
                                code="replica_failed")) + DONE})
        finally:
            watcher.cancel()
            if not ended:
                gen.cancel()
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _everywhere(self, wire: dict[str, Any], body: bytes) -> dict[str, Reply]:
        """The same request on every live replica (pinned), each one's whole reply."""
        if not routing.live_replicas():    # the handle's router starts with the first call
            await _collect(self.engine.forward.remote(RoutingHints(), {**wire, "method": "GET",
                                                                        "path": "/health"}, b""))
        ids = routing.live_replicas()
        # one replica after the other: an admin action, and a weights update is brief
        return {rid: await _collect(self.engine.forward.remote(RoutingHints(pin=rid), wire, body))
                for rid in ids}

    async def _weights(self, wire: dict[str, Any], body: bytes, send: Send) -> None:
        replies = await self._everywhere(wire, body)
        statuses = {status for status, _, _ in replies.values()}
        if statuses != {200} and len(statuses) == 1:      # e.g. 401/404 for a bad admin key
            status, headers, payload = next(iter(replies.values()))
            await send({"type": "http.response.start", "status": status,
                        "headers": list(headers.items())})
            await send({"type": "http.response.body", "body": payload})
            return
        each = [{"replica": rid, "status": status, **json.loads(payload)}
                for rid, (status, _, payload) in replies.items()]
        ok = statuses == {200}
        await send_json(send, 200 if ok else 502, {
            "object": "weights_update.replicas", "replicas": each,
            "weights_versions": {e["replica"]: e.get("weights_version") for e in each},
            **({} if ok else {"error": {"message": "the update failed on some replicas; see "
                                        "replicas", "type": "server_error", "param": None,
                                        "code": "weights_update_partial"}})})


class _App:
    """The ASGI callable (uvicorn, which runs the lifespan, takes a bound method for ASGI2)."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.ingress.asgi(scope, receive, send)


async def _collect(gen: Any) -> Reply:
    status, headers, chunks = 500, {}, []
    async for batch in gen:
        for message in batch:
            if message["type"] == "http.response.start":
                status, headers = message["status"], dict(message.get("headers", ()))
            else:
                chunks.append(message.get("body", b""))
    return status, headers, b"".join(chunks)


async def _cancel_on_disconnect(receive: Receive, gen: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gen.cancel()
