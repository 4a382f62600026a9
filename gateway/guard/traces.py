"""Diagnostic traces: what happened to one request, kept in a bounded in-memory ring.

A trace opens when a generation starts and closes when its response ends; it is in the ring
(and served at `GET /v1/traces/{id}`) from the start, so a stuck request can be inspected
too. Closed traces are appended to `<trace_dir>/traces.jsonl` when a directory is configured.
With a shared store (`--session-store redis://...`) a trace is also written there when its
last choice finishes, before the response's last bytes leave, so any replica serves it; one in
progress is served by the replica running it.

A trace holds a prompt and a completion, so it belongs to the API key that made the request:
the trace keeps an HMAC of that key (keyed by a secret of this process, so neither the ring
nor a core dump gives the key back) and only that key or the admin key reads it; any other
caller gets the same 404 as an unknown id. A withheld choice (`content_filter`: the guard
blocked it; in block mode also one not yet cleared, whose tokens are still held) keeps its
verdict, offsets and counts for everyone, its token ids and logprobs for the admin key only,
and in the JSONL file only with `--trace-withheld`.

The number of allowed tokens at each constrained step is not recorded while generating: the
engine fills the bitmask for the whole batch in one call and counting bits per row on the hot
path would cost every constrained step. It is recomputed on retrieval instead, by replaying the
completion through a fresh cursor of the (cached) compiled grammar; the count at step i is
what the grammar allowed before token i was chosen. Near max_tokens the engine may narrow that
mask further (grammars/closing.py); the replay reports the grammar's count, not the narrowed one.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import anyio.to_thread
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.protocol import NotFound
from grammars.spec import GrammarSpec

if TYPE_CHECKING:
    from gateway.state import Runtime

log = structlog.get_logger("plumbline.gateway")


@dataclass(slots=True)
class ChoiceTrace:
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)   # the request's mode (processed default)
    token_times: list[float] = field(default_factory=list)   # s after queued (one per token)
    weights_versions: list[int] = field(default_factory=list)   # one per token, when reported
    finish_reason: str | None = None

    def to_dict(self, index: int, redact: bool = False) -> dict[str, Any]:
        # A withheld choice's arrival times go too: they would retrace its token boundaries.
        return {"index": index, "num_completion_tokens": len(self.completion_ids),
                "completion_ids": None if redact else self.completion_ids,
                "logprobs": None if redact else self.logprobs,
                "token_times": None if redact else [round(t, 6) for t in self.token_times],
                "weights_versions": sorted(set(self.weights_versions)),
                "finish_reason": self.finish_reason, "redacted": redact}


@dataclass(slots=True)
class Trace:
    """One request. Times are Unix seconds (wall clock), None until they happen."""

    request_id: str              # the completion id (`chatcmpl-...`), the ring's key
    http_request_id: str | None  # the X-Request-Id of the HTTP request, also a key
    endpoint: str
    prompt_ids: list[int]
    logprobs_mode: str
    queued_at: float = field(default_factory=time.time)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    choices: list[ChoiceTrace] = field(default_factory=list)
    grammar: dict[str, Any] | None = None   # kind, backend, compile_ms
    guard: dict[str, Any] | None = None     # the policy in force: mode, release, checks
    verdicts: list[dict[str, Any] | None] = field(default_factory=list)   # one per choice
    events: list[dict[str, Any]] = field(default_factory=list)   # check events, in order
    max_events: int = 1000
    spec: Any = None     # the GrammarSpec, for the allowed-token replay (not serialized)
    owner: str | None = None   # TraceRing.owner_of(the request's API key); None: no keys
    # The token budget and the budget-aware closing reserve in force (grammars/closing.py), so
    # a viewer can tell which steps were steered to close: None when not recorded.
    max_tokens: int | None = None
    close_reserve: int | None = None

    def add_tokens(self, index: int, token_ids: Sequence[int], logprobs: Sequence[float],
                   weights_versions: Sequence[int] = ()) -> None:
        while len(self.choices) <= index:
            self.choices.append(ChoiceTrace())
        now = time.time()
        if token_ids and self.first_token_at is None:
            self.first_token_at = now
        choice = self.choices[index]
        choice.completion_ids.extend(token_ids)
        choice.logprobs.extend(logprobs)
        choice.token_times.extend([now - self.queued_at] * len(token_ids))
        choice.weights_versions.extend(weights_versions)

    def event(self, name: str, index: int, fields: dict[str, Any]) -> None:
        """A check event of choice `index` (a violation, a block, the final verdict)."""
        if len(self.events) < self.max_events:   # a runaway deny pattern cannot grow a trace
            self.events.append({"t": time.time(), "event": name, "index": index, **fields})

    def finish_choice(self, index: int, finish_reason: str | None,
                      verdict: dict[str, Any] | None) -> None:
        while len(self.choices) <= index:
            self.choices.append(ChoiceTrace())
        while len(self.verdicts) <= index:
            self.verdicts.append(None)
        self.choices[index].finish_reason = finish_reason
        self.verdicts[index] = verdict

    def is_withheld(self, index: int) -> bool:
        """Whether choice `index` may hold tokens the caller never received: blocked
        (`content_filter`) or, in block mode, not (yet) cleared by a passing verdict (still
        held, or cut off by an abort before the checks judged it)."""
        choice = self.choices[index]
        if choice.finish_reason == "content_filter":
            return True
        if self.guard is None or self.guard.get("mode") != "block":
            return False        # off and flag send every token as it is generated
        verdict = self.verdicts[index] if index < len(self.verdicts) else None
        return verdict is None or bool(verdict.get("blocked", True))

    def to_dict(self, redact_withheld: bool = False) -> dict[str, Any]:
        """The trace as served; `redact_withheld` drops the tokens of withheld choices."""
        return {"object": "plumbline.trace", "id": self.request_id,
                "http_request_id": self.http_request_id, "endpoint": self.endpoint,
                "timestamps": {"queued": self.queued_at, "admitted": self.admitted_at,
                               "first_token": self.first_token_at, "finished": self.finished_at},
                "prompt_ids": self.prompt_ids, "logprobs_mode": self.logprobs_mode,
                "choices": [c.to_dict(i, redact_withheld and self.is_withheld(i))
                            for i, c in enumerate(self.choices)],
                "grammar": self.grammar, "guard": self.guard,
                "max_tokens": self.max_tokens, "close_reserve": self.close_reserve,
                "checks": self.verdicts, "events": self.events}

    def to_record(self) -> dict[str, Any]:
        """Every field, for a shared store (tokens of withheld choices, owner, grammar too);
        `from_record` rebuilds the trace, whatever fields it grows."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["choices"] = [{f.name: getattr(c, f.name) for f in fields(c)} for c in self.choices]
        record["spec"] = None if self.spec is None else [self.spec.kind, self.spec.source]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Trace:
        spec = record["spec"]
        return cls(**{**record, "choices": [ChoiceTrace(**c) for c in record["choices"]],
                      "spec": None if spec is None else GrammarSpec(*spec)})


class SharedTraces(Protocol):
    """Closed traces where every replica finds them (`redis_store.RedisTraceStore`)."""

    async def put(self, record: dict[str, Any]) -> None: ...

    async def get(self, request_id: str) -> dict[str, Any] | None: ...


class TraceRing:
    """The last `max_traces` traces by id; optionally appended to a JSONL file when closed."""

    def __init__(self, max_traces: int = 1000, trace_dir: str | Path | None = None,
                 keep_withheld: bool = False, shared: SharedTraces | None = None,
                 secret: bytes | None = None) -> None:
        assert max_traces >= 0
        self.max_traces = max_traces
        self.keep_withheld = keep_withheld     # the file keeps blocked choices' tokens too
        self.shared = shared
        # Owners are comparable where the secret is known: this process, or every replica of
        # a shared store (which hands them one secret).
        self._secret = secret if secret is not None else os.urandom(32)
        self._writes: set[asyncio.Task[None]] = set()
        self._traces: OrderedDict[str, Trace] = OrderedDict()
        self._aliases: dict[str, str] = {}     # http request id -> completion id
        self._path: Path | None = None
        self._lock = threading.Lock()          # file appends may come from several threads
        if trace_dir is not None:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
            self._path = Path(trace_dir) / "traces.jsonl"

    def open(self, trace: Trace) -> Trace:
        if self.max_traces == 0:
            return trace        # still written to the file at close when configured
        self._traces[trace.request_id] = trace
        if trace.http_request_id:
            self._aliases[trace.http_request_id] = trace.request_id
        while len(self._traces) > self.max_traces:
            _, old = self._traces.popitem(last=False)
            if old.http_request_id and self._aliases.get(old.http_request_id) == old.request_id:
                del self._aliases[old.http_request_id]
        return trace

    def close(self, trace: Trace) -> None:
        if self._finish(trace) and self.shared is not None:
            # a response that ended early (error, disconnect): written in the background
            task = asyncio.get_running_loop().create_task(self._put(trace))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def persist(self, trace: Trace) -> None:
        """The normal end, with a shared store: closed and written before the response's last
        bytes leave, so a client that has them finds the trace on any replica."""
        if self.shared is not None and self._finish(trace):
            await self._put(trace)

    async def _put(self, trace: Trace) -> None:
        assert self.shared is not None
        try:
            await self.shared.put(trace.to_record())
        except Exception:    # a diagnostic: losing it must not fail the response
            log.warning("trace_store_failed", trace_id=trace.request_id, exc_info=True)

    async def fetch(self, request_id: str) -> Trace | None:
        """This replica's ring first, then the shared store (a 503 naming it when it is down)."""
        trace = self.get(request_id)
        if trace is None and self.shared is not None:
            record = await self.shared.get(request_id)
            trace = None if record is None else Trace.from_record(record)
        return trace

    def _finish(self, trace: Trace) -> bool:
        if trace.finished_at is not None:
            return False
        trace.finished_at = time.time()
        if self._path is not None:
            # One short line per request, appended on the event loop: small next to the
            # response it describes. A file error loses the line, never the response.
            body = trace.to_dict(redact_withheld=not self.keep_withheld)
            line = json.dumps(body, separators=(",", ":"))
            try:
                with self._lock, self._path.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError:
                pass
        return True

    def owner_of(self, api_key: bytes) -> str:
        """The identity a trace keeps of an API key: an HMAC, never the key itself."""
        return hmac.new(self._secret, api_key, hashlib.sha256).hexdigest()

    def get(self, request_id: str) -> Trace | None:
        trace = self._traces.get(request_id)
        if trace is None and request_id in self._aliases:
            trace = self._traces.get(self._aliases[request_id])
        return trace

    def __len__(self) -> int:
        return len(self._traces)


async def get_trace(request: Request) -> Response:
    """`GET /v1/traces/{request_id}`: by completion id or X-Request-Id, for the API key that
    made the request or the admin key (AuthMiddleware puts both on the request state)."""
    return JSONResponse(await read_trace(request))


async def read_trace(request: Request) -> dict[str, Any]:
    """The body of `GET /v1/traces/{request_id}` under its access rules (404 otherwise)."""
    rt: Runtime = request.state.runtime
    if not rt.config.traces_enabled:
        raise NotFound("traces are off: this server has no API key, so anyone who can reach it "
                       "could read every prompt and completion; start it with --api-key (a "
                       "trace is then read with the key that made the request) or --traces",
                       code="traces_disabled")
    request_id = request.path_params["request_id"]
    is_admin: bool = getattr(request.state, "is_admin", False)
    trace = await rt.traces.fetch(request_id)
    # Another key's trace is as unknown as a missing one: a 403 would confirm that it exists.
    if trace is None or not (is_admin or hmac.compare_digest(
            trace.owner or "", getattr(request.state, "trace_owner", None) or "")):
        raise NotFound(f"no trace for '{request_id}' (the last {rt.traces.max_traces} "
                       "requests are kept)", "request_id", code="trace_not_found")
    body = trace.to_dict(redact_withheld=not is_admin)
    engine = rt.engine
    if trace.spec is not None and body["grammar"] is not None and engine is not None:
        body["grammar"]["allowed_token_counts"] = await _allowed_token_counts(
            engine, trace, body["choices"])
    return body


async def _allowed_token_counts(engine: Any, trace: Trace,
                                shown: list[dict[str, Any]]) -> list[list[int] | None] | None:
    """The grammar's allowed-token count at each step, per choice; None for a redacted choice
    (the counts would retrace its tokens), None overall when the engine cannot replay."""
    counts: list[list[int] | None] = []
    try:
        for choice, body in zip(trace.choices, shown):
            if body["redacted"]:
                counts.append(None)
                continue
            replay = await anyio.to_thread.run_sync(engine.allowed_token_counts, trace.spec,
                                                    choice.completion_ids)
            if replay is None:       # the engine cannot replay this grammar
                return None
            counts.append(replay)
    except Exception:   # a diagnostic must not fail the trace (evicted, weights swapped)
        log.warning("trace_replay_failed", trace_id=trace.request_id, exc_info=True)
        return None
    return counts
