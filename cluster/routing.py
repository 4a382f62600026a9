"""Which engine replica serves a request: a Ray Serve `RequestRouter`.

Ray's HTTP proxy routes before the body is read, so it cannot see `plumbline.session_id` or
the prompt. As Ray Serve LLM does (OpenAiIngress -> LLMServer), the ingress deployment reads
the body and calls the engine deployment through a `DeploymentHandle` with `RoutingHints` as
the first argument; the router (`router.py`), running inside the ingress's handle, reads them:

1. `pin`: one named replica (the weights and metrics fan-outs);
2. a session: the replica the session id hashes to (rendezvous hashing over the live
   replicas, so a replica leaving moves only its own sessions), while it has room;
3. a prompt prefix: the replica the hash of the prompt's first characters maps to, the same
   way, so requests sharing a system prompt meet the KV blocks the first one left (only
   prompts at least that long: a shorter one has little to share);
4. otherwise, or when the preferred replica is full: power of two choices on queue length.

`exclude` drops replicas that already answered 429, so the ingress retries elsewhere. Queue
lengths, the "full" test (`max_ongoing_requests`), probing, backoff and replica membership
are Ray Serve's.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PREFIX_CHARS = 256     # ~ the first four 16-token KV blocks of English text


@dataclass(frozen=True, slots=True)
class RoutingHints:
    session_id: str | None = None
    prefix_key: str | None = None      # a hash of the prompt's first PREFIX_CHARS
    exclude: frozenset[str] = frozenset()   # replica ids that refused (429)
    pin: str | None = None             # exactly this replica

    @property
    def affinity(self) -> str | None:
        if self.session_id is not None:
            return "session:" + self.session_id
        return None if self.prefix_key is None else "prefix:" + self.prefix_key


def hints_for(body: Any) -> RoutingHints:
    """Hints from a parsed request body; anything unexpected just means no affinity."""
    if not isinstance(body, dict):
        return RoutingHints()
    ext = body.get("plumbline")
    session = ext.get("session_id") if isinstance(ext, dict) else None
    if isinstance(session, str) and session:
        return RoutingHints(session_id=session)
    window = _prefix(body)
    if not window:
        return RoutingHints()
    digest = hashlib.blake2b(window.encode(), digest_size=8).hexdigest()
    return RoutingHints(prefix_key=digest)


def _prefix(body: dict[str, Any]) -> str:
    """The prompt's first PREFIX_CHARS characters (PREFIX_CHARS // 4 token ids), or "" for a
    shorter prompt: it fills few KV blocks that another prompt could share, so it is not worth
    a replica chosen by hash (distinct short prompts would land by chance, unbalanced) rather
    than by queue length."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            parts.append(content if isinstance(content, str) else "")
        text = "\x00".join(parts)
        return text[:PREFIX_CHARS] if len(text) >= PREFIX_CHARS else ""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):                  # token ids
        n = PREFIX_CHARS // 4
        return ",".join(str(t) for t in prompt[:n]) if len(prompt) >= n else ""
    if isinstance(prompt, str) and len(prompt) >= PREFIX_CHARS:
        return prompt[:PREFIX_CHARS]
    return ""


def rendezvous(key: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Replicas in the key's order of preference (highest random weight first)."""
    def weight(r: RunningReplica) -> bytes:
        return hashlib.blake2b(f"{key}|{r.replica_id.unique_id}".encode(), digest_size=8).digest()
    return sorted(replicas, key=weight, reverse=True)




_routers: dict[int, RequestRouter] = {}    # this process's routers (the ingress's handle)


def register(router: RequestRouter) -> None:
    _routers[id(router)] = router


def live_replicas() -> list[str]:
    """Ids of the engine replicas this process's router knows to be running."""
    return sorted({rid.unique_id for r in list(_routers.values()) for rid in r.curr_replicas})


def hints_of(pending_request: PendingRequest | None) -> RoutingHints:
    if pending_request is not None:
        for arg in pending_request.args:
            if isinstance(arg, RoutingHints):
                return arg
    return RoutingHints()
