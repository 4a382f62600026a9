"""Diagnostic traces: what happened to one request, kept in a bounded in-memory ring.

A trace opens when a generation starts and closes when its response ends; it is in the ring
(and served at `GET /v1/traces/{id}`) from the start, so a stuck request can be inspected
too. Closed traces are appended to `<trace_dir>/traces.jsonl` when a directory is configured.

The number of allowed tokens at each constrained step is not recorded while generating: the
engine fills the bitmask for the whole batch in one call and counting bits per row on the hot
path would cost every constrained step. It is recomputed on retrieval instead, by replaying the
completion through a fresh cursor of the (cached) compiled grammar; the count at step i is
what the grammar allowed before token i was chosen. Near max_tokens the engine may narrow that
mask further (grammars/closing.py); the replay reports the grammar's count, not the narrowed one.
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import anyio.to_thread
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.protocol import NotFound

if TYPE_CHECKING:
    from gateway.state import Runtime

log = structlog.get_logger("plumbline.gateway")


@dataclass(slots=True)
class ChoiceTrace:
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)   # the request's mode (processed default)
    finish_reason: str | None = None

    def to_dict(self, index: int) -> dict[str, Any]:
        return {"index": index, "completion_ids": self.completion_ids,
                "logprobs": self.logprobs, "finish_reason": self.finish_reason}


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

    def add_tokens(self, index: int, token_ids: Sequence[int], logprobs: Sequence[float]) -> None:
        while len(self.choices) <= index:
            self.choices.append(ChoiceTrace())
        if token_ids and self.first_token_at is None:
            self.first_token_at = time.time()
        choice = self.choices[index]
        choice.completion_ids.extend(token_ids)
        choice.logprobs.extend(logprobs)

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

    def to_dict(self) -> dict[str, Any]:
        return {"object": "plumbline.trace", "id": self.request_id,
                "http_request_id": self.http_request_id, "endpoint": self.endpoint,
                "timestamps": {"queued": self.queued_at, "admitted": self.admitted_at,
                               "first_token": self.first_token_at, "finished": self.finished_at},
                "prompt_ids": self.prompt_ids, "logprobs_mode": self.logprobs_mode,
                "choices": [c.to_dict(i) for i, c in enumerate(self.choices)],
                "grammar": self.grammar, "guard": self.guard,
                "checks": self.verdicts, "events": self.events}


class TraceRing:
    """The last `max_traces` traces by id; optionally appended to a JSONL file when closed."""

    def __init__(self, max_traces: int = 1000, trace_dir: str | Path | None = None) -> None:
        assert max_traces >= 0
        self.max_traces = max_traces
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
        if trace.finished_at is not None:
            return
        trace.finished_at = time.time()
        if self._path is not None:
            # One short line per request, appended on the event loop: small next to the
            # response it describes. A file error loses the line, never the response.
            line = json.dumps(trace.to_dict(), separators=(",", ":"))
            try:
                with self._lock, self._path.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError:
                pass

    def get(self, request_id: str) -> Trace | None:
        trace = self._traces.get(request_id)
        if trace is None and request_id in self._aliases:
            trace = self._traces.get(self._aliases[request_id])
        return trace

    def __len__(self) -> int:
        return len(self._traces)


async def get_trace(request: Request) -> Response:
    """`GET /v1/traces/{request_id}`: by completion id or X-Request-Id; behind the API key."""
    rt: Runtime = request.state.runtime
    request_id = request.path_params["request_id"]
    trace = rt.traces.get(request_id)
    if trace is None:
        raise NotFound(f"no trace for '{request_id}' (the last {rt.traces.max_traces} "
                       "requests are kept)", "request_id", code="trace_not_found")
    body = trace.to_dict()
    engine = rt.engine
    if trace.spec is not None and body["grammar"] is not None and engine is not None:
        counts = None
        try:
            replays = [await anyio.to_thread.run_sync(engine.allowed_token_counts, trace.spec,
                                                      c.completion_ids)
                       for c in trace.choices]
            # None: the engine cannot replay this grammar
            counts = None if any(r is None for r in replays) else replays
        except Exception:   # a diagnostic must not fail the trace (evicted, weights swapped)
            log.warning("trace_replay_failed", trace_id=trace.request_id, exc_info=True)
        body["grammar"]["allowed_token_counts"] = counts
    return JSONResponse(body)
