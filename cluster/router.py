"""The Ray Serve `RequestRouter` that applies `routing.py`'s policy.

Kept apart because Ray pickles a router's module by value into each process that routes: the
hints class and the registry of live routers must stay in `routing`, imported by name, so
`isinstance` and `routing.live_replicas()` see the same objects as the ingress.
"""
from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from cluster import routing


class PlumblineRouter(RequestRouter):
    """Session stickiness, then prefix affinity, then power of two choices (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._attempts: dict[str, int] = {}     # internal request id -> choose_replicas calls
        routing.register(self)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        hints = routing.hints_of(pending_request)
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True   # full everywhere: back off
        if hints.pin is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == hints.pin]]
        candidates = [r for r in candidate_replicas
                      if r.replica_id.unique_id not in hints.exclude]
        if not candidates:
            return []
        ranks: list[list[RunningReplica]] = []
        key = hints.affinity
        if key is not None:
            preferred, *rest = routing.rendezvous(key, candidates)
            ranks.append([preferred])          # Ray takes it unless its queue is full
            # A session waits for its replica (Ray backs off and asks again); a prefix gives up
            # its cache after one miss, which may also be a queue-length probe that was late.
            if hints.session_id is not None or self._attempt(pending_request) == 0:
                return ranks
            candidates = rest
        if candidates:
            ranks.append(random.sample(candidates, min(2, len(candidates))))
        return ranks

    def _attempt(self, pending_request: PendingRequest | None) -> int:
        if pending_request is None:
            return 1
        if len(self._attempts) > 10_000:        # requests cancelled while routing
            self._attempts.clear()
        rid = pending_request.metadata.internal_request_id
        n = self._attempts.get(rid, 0)
        self._attempts[rid] = n + 1
        return n

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any,
                          result: Any) -> None:
        self._attempts.pop(pending_request.metadata.internal_request_id, None)
