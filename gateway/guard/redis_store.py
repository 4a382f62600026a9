"""Shared state on Redis (`--session-store redis://host:port/db`): what replicas must agree on.

- session facts: one hash per session (`plumbline:session:<id>`, field = JSON pointer, value =
  the fact as JSON), its lifetime a Redis expiry renewed by every save, as in memory;
- closed traces: one string per trace (`plumbline:trace:<id>`, the full record as JSON) and an
  alias per X-Request-Id, expiring with the same TTL; the per-replica ring still bounds memory;
- the secret that keys trace owners (an HMAC of the API key, never the key): one per store,
  so a trace written by one replica is readable by the same key on another.

Redis down: `load`/`save` raise `StoreUnavailable` (a 503 naming the store) for requests with a
session; requests without one never touch Redis. A trace that cannot be written is logged and
lost; reading one while Redis is down is a 503. Commands time out after `timeout_s`, so a hung
Redis costs a request that long, not forever.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

import structlog

from gateway.guard.facts import Assertion
from gateway.guard.sessions import StoreUnavailable

log = structlog.get_logger("plumbline.gateway")

_PREFIX = "plumbline:"
_SECRET_KEY = _PREFIX + "trace-secret"


def store_name(url: str) -> str:
    """The URL without its password: what errors and logs may show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class RedisSessionStore:
    """Session facts in Redis; a session expires `ttl_s` after its last save."""

    def __init__(self, client: Any, name: str, ttl_s: float) -> None:
        self.client, self.name, self.ttl_s = client, name, ttl_s

    async def load(self, session_id: str) -> list[Assertion]:
        raw = await _call(self.name, self.client.hgetall(_PREFIX + "session:" + session_id))
        facts = [json.loads(v) for v in raw.values()]
        return [Assertion(f["key"], f["value"], f["source"]) for f in facts]

    async def save(self, session_id: str, assertions: Iterable[Assertion]) -> None:
        mapping = {a.key: json.dumps({"key": a.key, "value": a.value, "source": a.source})
                   for a in assertions}
        key = _PREFIX + "session:" + session_id
        async with self.client.pipeline(transaction=True) as pipe:   # MULTI: both or neither
            if mapping:
                pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, int(self.ttl_s * 1000))
            await _call(self.name, pipe.execute())


class RedisTraceStore:
    """Closed traces in Redis, by completion id and by X-Request-Id."""

    def __init__(self, client: Any, name: str, ttl_s: float) -> None:
        self.client, self.name, self.ttl_s = client, name, ttl_s

    async def put(self, record: dict[str, Any]) -> None:
        ms = int(self.ttl_s * 1000)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(_PREFIX + "trace:" + record["request_id"], json.dumps(record), px=ms)
            if record["http_request_id"]:
                pipe.set(_PREFIX + "trace-alias:" + record["http_request_id"],
                         record["request_id"], px=ms)
            await _call(self.name, pipe.execute())

    async def get(self, request_id: str) -> dict[str, Any] | None:
        raw = await _call(self.name, self.client.get(_PREFIX + "trace:" + request_id))
        if raw is None:
            alias = await _call(self.name, self.client.get(_PREFIX + "trace-alias:" + request_id))
            if alias is not None:
                raw = await _call(self.name, self.client.get(_PREFIX + "trace:" + alias.decode()))
        return None if raw is None else dict(json.loads(raw))


@dataclass(slots=True)
class SharedState:
    sessions: RedisSessionStore
    traces: RedisTraceStore
    trace_secret: bytes | None     # None: Redis was down at start; owners stay per-process
    client: Any

    async def aclose(self) -> None:
        await self.client.aclose()


def open_shared_state(url: str, ttl_s: float, timeout_s: float = 2.0) -> SharedState:
    """Clients for `url` (connections open on first use) and the store's trace secret."""
    try:
        import redis
        import redis.asyncio
    except ImportError:
        raise AssertionError("--session-store needs redis-py: pip install 'plumbline[cluster]'") \
            from None
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    name = store_name(url)
    # One immediate retry on a broken connection: after a Redis restart the pooled connections
    # are dead, and the first command on each must reconnect rather than fail the request.
    client = redis.asyncio.Redis.from_url(url, socket_timeout=timeout_s,
                                          socket_connect_timeout=timeout_s,
                                          retry=Retry(NoBackoff(), 1),
                                          retry_on_error=[redis.ConnectionError])
    return SharedState(RedisSessionStore(client, name, ttl_s), RedisTraceStore(client, name, ttl_s),
                       _trace_secret(redis, url, name, timeout_s), client)


def _trace_secret(redis: Any, url: str, name: str, timeout_s: float) -> bytes | None:
    # Blocking, once at start-up (before the server listens): the first replica sets the
    # secret, every later one reads that same value.
    try:
        with redis.Redis.from_url(url, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s) as client:
            client.set(_SECRET_KEY, os.urandom(32), nx=True)
            secret: bytes = client.get(_SECRET_KEY)
            return secret
    except redis.RedisError as exc:
        log.warning("session_store_unreachable_at_start", store=name, error=str(exc),
                    consequence="traces written now are readable on this replica only")
        return None


async def _call(name: str, pending: Any) -> Any:
    import redis

    try:
        return await pending
    except (redis.RedisError, OSError) as exc:
        log.warning("session_store_failed", store=name, error=str(exc))
        raise StoreUnavailable(f"the session store {name} is unavailable ({type(exc).__name__}); "
                               "requests without plumbline.session_id are still served",
                               "plumbline.session_id") from None
