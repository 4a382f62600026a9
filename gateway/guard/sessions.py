"""The session store: facts kept across requests under `plumbline.session_id`.

One process keeps them in memory (the default); replicas share them through Redis
(`--session-store redis://...`, `redis_store.py`). The interface is async because a shared
store is a network round trip: a session's facts are loaded before the response starts and
saved before its last update leaves, so the next request of the session, on any replica,
sees them.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Protocol

from gateway.guard.facts import Assertion
from gateway.protocol import Unavailable


class StoreUnavailable(Unavailable):
    """The shared store did not answer: a 503 naming it (requests without a session go on)."""

    code = "session_store_unavailable"


class SessionStore(Protocol):
    """Facts kept across requests under `plumbline.session_id`; a shared store can replace it."""

    async def load(self, session_id: str) -> list[Assertion]: ...

    async def save(self, session_id: str, assertions: Iterable[Assertion]) -> None: ...


class InMemorySessionStore:
    """Per-process store; a session expires `ttl_s` after its last save."""

    def __init__(self, ttl_s: float = 3600.0, max_sessions: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_sessions, self.clock = ttl_s, max_sessions, clock
        self._sessions: dict[str, tuple[float, dict[str, Assertion]]] = {}
        self._lock = threading.Lock()

    async def load(self, session_id: str) -> list[Assertion]:
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None:
                return []
            if entry[0] <= self.clock():
                del self._sessions[session_id]
                return []
            return list(entry[1].values())

    async def save(self, session_id: str, assertions: Iterable[Assertion]) -> None:
        with self._lock:
            now = self.clock()
            entry = self._sessions.pop(session_id, None)
            facts = entry[1] if entry is not None and entry[0] > now else {}
            for a in assertions:
                facts[a.key] = a
            self._sessions[session_id] = (now + self.ttl_s, facts)   # re-insert: newest last
            while len(self._sessions) > self.max_sessions:           # drop the stalest
                del self._sessions[next(iter(self._sessions))]
