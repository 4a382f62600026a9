"""Locust scenarios for plumbline's OpenAI-compatible API.

Run headless through `python -m loadtests.run`, or directly:
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

Each user class has a weight read from the environment (0 leaves it out of a mixed run) and the
scenarios share a few knobs; this module is the only one of loadtests/ that reads them:

    PLUMBLINE_LT_MODEL          model id sent in requests (default: the server's first model)
    PLUMBLINE_LT_API_KEY        sent as `Authorization: Bearer ...` (a server with --api-key)
    PLUMBLINE_LT_MAX_TOKENS     max_tokens for free-text answers (default 64)
    PLUMBLINE_LT_WEIGHT_<NAME>  weight of a user class, NAME one of CHAT, PLAIN, JSON, TOOLS, GUARD
    PLUMBLINE_LT_STATS_JSON     where to write the final statistics as JSON when Locust quits
                                (its CSV can be written before the last users finish)

Against `plumbline serve --replicas N` each response names its replica (`x-plumbline-replica`);
the statistics count HTTP requests and failures per replica ("" for a request that failed
before any replica answered).

Besides the HTTP requests, streamed responses report two measurements as Locust events (request
type "SSE", so runners can tell them from HTTP requests): "ttft" (request sent to the first
content chunk) and "itl" (the gap between consecutive content chunks; one token per chunk unless
the client fell behind and the server merged deltas). An SSE error chunk, a stream without
`[DONE]` or a response that breaks its scenario's contract is a failure, with a message saying
which. A feature the server refuses with 400 "not supported" fails as
"feature not enabled on this server: ...", so a run against a server without it says so.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from locust import HttpUser, between, events, task

from loadtests.sse import sse_events

SSE = "SSE"        # request_type of the measurement events, never an HTTP method
API_KEY = os.environ.get("PLUMBLINE_LT_API_KEY", "")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


MAX_TOKENS = _env_int("PLUMBLINE_LT_MAX_TOKENS", 64)

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Give three tips for writing clear commit messages.",
    "What is the difference between a list and a tuple in Python?",
    "Write a haiku about a lighthouse in winter.",
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "How does a hash map handle collisions?",
    "Name four planets and one fact about each.",
    "Why do programmers write unit tests?",
]


class ScenarioFailure(Exception):
    """A response that arrived but breaks the scenario's contract."""


def _error_text(response: Any) -> str:
    try:
        body = response.json()
        message = body.get("error", {}).get("message") or str(body)
    except Exception:
        message = (response.text or "")[:300]
    return f"HTTP {response.status_code}: {message}"


def _check_status(response: Any) -> None:
    if response.status_code == 200:
        return
    text = _error_text(response)
    lowered = text.lower()
    missing = "not supported" in lowered or "unknown field 'plumbline." in lowered
    if response.status_code == 400 and missing:
        raise ScenarioFailure(f"{FEATURE_MISSING}: {text}")
    raise ScenarioFailure(text)


# ------------------------------------------------------------------------------------ users


FEATURE_MISSING = "feature not enabled on this server"


class _OpenAIUser(HttpUser):
    abstract = True
    model = os.environ.get("PLUMBLINE_LT_MODEL", "")
    # A user whose feature the server refuses slows to one try per 5 s: the failure is reported
    # without flooding the run with identical 400s.
    feature_missing = False
    _think = staticmethod(between(0.0, 0.5))

    def wait_time(self) -> float:
        return 5.0 if self.feature_missing else self._think(self)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        if not self.model:
            with self.client.get("/v1/models", name="/v1/models", catch_response=True) as r:
                if r.status_code != 200:
                    self.fail(r, _error_text(r))
                    return
                type(self).model = r.json()["data"][0]["id"]

    def fail(self, response: Any, message: str) -> None:
        if FEATURE_MISSING in message:
            self.feature_missing = True
        response.failure(message)

    def _fire(self, name: str, seconds: float, length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type=SSE, name=name, response_time=seconds * 1000.0, response_length=length,
            exception=None, context={})

    def _fire_failure(self, name: str, exc: Exception) -> None:
        """A contract broken after the HTTP response succeeded: a failed SSE event."""
        self.environment.events.request.fire(
            request_type=SSE, name=name, response_time=0.0, response_length=0, context={},
            exception=exc)

    def post_json(self, path: str, body: dict[str, Any], name: str) -> dict[str, Any] | None:
        """POST a non-streaming request; the parsed body, or None after recording a failure."""
        with self.client.post(path, json=body, name=name, catch_response=True) as r:
            try:
                _check_status(r)
                return r.json()
            except (ScenarioFailure, ValueError) as exc:
                self.fail(r, str(exc))
                return None

    def stream_chat(self, body: dict[str, Any], name: str) -> Streamed:
        """Stream a chat completion. Raises ScenarioFailure; the caller's `catch_response` block
        turns it into a Locust failure."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, name=name, stream=True,
                              catch_response=True) as r:
            try:
                _check_status(r)
                result = self._read_stream(r, start, name, tools=body.get("tools") is not None)
            except ScenarioFailure as exc:
                self.fail(r, str(exc))
                raise
            except Exception as exc:           # a connection cut mid-stream, bad JSON
                self.fail(r, f"{type(exc).__name__}: {exc}")
                raise ScenarioFailure(str(exc)) from exc
            r.success()
            return result

    def _read_stream(self, r: Any, start: float, name: str, tools: bool = False) -> Streamed:
        """Read an SSE chat stream. Tool-call deltas are assembled per index (a delta without
        `tools` in the request, or argument text for a call not yet announced with index, id,
        type and name, is a failure); the guard's `plumbline` news is collected."""
        out = Streamed()
        parts: list[str] = []
        previous: float | None = None
        done = False
        for data in sse_events(r.iter_lines(chunk_size=None)):
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise ScenarioFailure(f"error chunk: {chunk['error']}")
            out.last = chunk
            news = chunk.get("plumbline") or {}
            out.violations += news.get("violations") or []
            if news.get("checks") is not None:
                out.verdict = news["checks"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    now = time.perf_counter()
                    if previous is None:
                        self._fire(f"ttft {name}", now - start)
                    else:
                        self._fire(f"itl {name}", now - previous)
                    previous = now
                    parts.append(delta["content"])
                for call in delta.get("tool_calls") or []:
                    if not tools:
                        raise ScenarioFailure(f"tool-call delta without tools: {call}")
                    _add_call_delta(out.calls, call)
                if choice.get("finish_reason"):
                    out.finish = choice["finish_reason"]
        if not done:
            raise ScenarioFailure("stream ended without [DONE]")
        if out.finish is None:
            raise ScenarioFailure("stream sent no finish_reason")
        # Locust timed the headers; the HTTP entry of a stream should time the whole response
        r.request_meta["response_time"] = (time.perf_counter() - start) * 1000.0
        out.content = "".join(parts)
        return out


@dataclass
class Streamed:
    """What one streamed chat completion said."""
    content: str = ""
    finish: str | None = None
    last: dict[str, Any] = field(default_factory=dict)      # the last chunk (usage, if asked)
    calls: list[dict[str, Any]] = field(default_factory=list)  # tool calls, deltas assembled
    verdict: dict[str, Any] | None = None                   # plumbline.checks, when checks ran
    violations: list[dict[str, Any]] = field(default_factory=list)  # plumbline.violations, all


def _add_call_delta(calls: list[dict[str, Any]], delta: dict[str, Any]) -> None:
    """One entry of `delta.tool_calls`: the first per index announces the call (index, id, type,
    name), later ones carry argument fragments, which concatenate."""
    index = delta.get("index")
    function = delta.get("function") or {}
    if index == len(calls):
        if not (delta.get("id") and delta.get("type") == "function" and function.get("name")):
            raise ScenarioFailure(f"first delta of tool call {index} lacks id/type/name: {delta}")
        calls.append({"id": delta["id"], "type": "function",
                      "function": {"name": function["name"],
                                   "arguments": function.get("arguments") or ""}})
    elif isinstance(index, int) and 0 <= index < len(calls):
        if "id" in delta or "name" in function:
            raise ScenarioFailure(f"tool call {index} announced twice: {delta}")
        calls[index]["function"]["arguments"] += function.get("arguments") or ""
    else:
        raise ScenarioFailure(f"tool-call delta out of order (index {index!r} after "
                              f"{len(calls)} calls)")


class StreamingChatUser(_OpenAIUser):
    """Streaming chat over SSE: the everyday chat-UI load."""

    weight = _env_int("PLUMBLINE_LT_WEIGHT_CHAT", 4)

    @task
    def chat(self) -> None:
        body = {"model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0.7,
                "messages": [{"role": "user", "content": random.choice(PROMPTS)}]}
        try:
            result = self.stream_chat(body, "chat stream")
        except ScenarioFailure:
            return
        finish, usage = result.finish, result.last.get("usage") or {}
        if usage.get("completion_tokens", 0) > MAX_TOKENS or finish not in ("stop", "length"):
            self._fire_failure("chat stream contract",
                               ScenarioFailure(f"finish_reason {finish!r}, usage {usage}"))


class PlainUser(_OpenAIUser):
    """Non-streaming chat and legacy completions."""

    weight = _env_int("PLUMBLINE_LT_WEIGHT_PLAIN", 1)

    @task(2)
    def chat(self) -> None:
        body = {"model": self.model, "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": random.choice(PROMPTS)}]}
        with self.client.post("/v1/chat/completions", json=body, name="chat", catch_response=True) as r:
            try:
                _check_status(r)
                choice = r.json()["choices"][0]
                if choice["finish_reason"] not in ("stop", "length"):
                    raise ScenarioFailure(f"finish_reason {choice['finish_reason']!r}")
                if r.json()["usage"]["completion_tokens"] > MAX_TOKENS:
                    raise ScenarioFailure("more tokens than max_tokens")
            except (ScenarioFailure, ValueError, KeyError) as exc:
                self.fail(r, str(exc))

    @task(1)
    def completion(self) -> None:
        body = {"model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0.8,
                "prompt": "Once upon a time, " + random.choice(["a robot", "a cat", "a sailor"])}
        with self.client.post("/v1/completions", json=body, name="completion", catch_response=True) as r:
            try:
                _check_status(r)
                choice = r.json()["choices"][0]
                if choice["finish_reason"] not in ("stop", "length"):
                    raise ScenarioFailure(f"finish_reason {choice['finish_reason']!r}")
            except (ScenarioFailure, ValueError, KeyError) as exc:
                self.fail(r, str(exc))


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 24},
        "temperature_c": {"type": "integer", "minimum": -60, "maximum": 60},
        "conditions": {"enum": ["sunny", "cloudy", "rain", "snow", "fog"]},
        "wind_kmh": {"type": "integer", "minimum": 0, "maximum": 200},
    },
    "required": ["city", "temperature_c", "conditions", "wind_kmh"],
    "additionalProperties": False,
}
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Toronto", "Cairo", "Perth"]


class StructuredOutputUser(_OpenAIUser):
    """JSON-schema structured output, streamed; the result must parse and validate."""

    weight = _env_int("PLUMBLINE_LT_WEIGHT_JSON", 2)

    @task
    def weather(self) -> None:
        city = random.choice(CITIES)
        body = {"model": self.model, "max_tokens": 128, "temperature": 0.7,
                "messages": [{"role": "user",
                              "content": f"Report today's weather in {city} as JSON."}],
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA,
                                                    "strict": True}}}
        start = time.perf_counter()
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with self.client.post("/v1/chat/completions", json=body, name="json_schema stream",
                              stream=True, catch_response=True) as r:
            try:
                _check_status(r)
                result = self._read_stream(r, start, "json_schema stream")
                content, finish = result.content, result.finish
                if finish != "stop":
                    raise ScenarioFailure(f"structured output ended with {finish!r} (truncated?)")
                jsonschema.validate(json.loads(content), WEATHER_SCHEMA)
            except (ScenarioFailure, ValueError, jsonschema.ValidationError) as exc:
                self.fail(r, f"{type(exc).__name__}: {str(exc)[:300]}")
            except Exception as exc:
                self.fail(r, f"{type(exc).__name__}: {exc}")


TOOLS: list[dict[str, Any]] = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "maxLength": 40},
                                      "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"], "additionalProperties": False},
    },
}]


class ToolAgentUser(_OpenAIUser):
    """An agent loop: the model calls a tool (`tool_choice` "required"; streamed three times in
    four, parallel calls allowed half the time), gets its result, then answers in streamed text
    (`tool_choice` "none"). Streamed call deltas must arrive in order (index, id, type and name
    first); every call must name a known tool and its arguments must parse and satisfy the
    tool's schema; each one is counted as an SSE event "tool call <name>"."""

    weight = _env_int("PLUMBLINE_LT_WEIGHT_TOOLS", 1)

    @task
    def agent_turn(self) -> None:
        city = random.choice(CITIES)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a helpful assistant. Use tools when useful."},
            {"role": "user", "content": f"What's the weather like in {city} right now?"}]
        # 96 tokens: a call fits with room (the grammar closes a call near max_tokens). Half the
        # turns allow parallel calls (the default model then usually makes two), half exactly one.
        parallel = random.random() < 0.5
        body = {"model": self.model, "max_tokens": 96, "messages": messages, "tools": TOOLS,
                "tool_choice": "required", "parallel_tool_calls": parallel}
        if random.random() < 0.75:
            try:
                result = self.stream_chat(body, "tools call stream")
            except ScenarioFailure:
                return
            calls, finish = result.calls, result.finish
            try:
                self._check_calls(calls, finish, parallel)
            except ScenarioFailure as exc:
                self._fire_failure("tools call stream contract", exc)
                return
        else:
            with self.client.post("/v1/chat/completions", json=body, name="tools call",
                                  catch_response=True) as r:
                try:
                    _check_status(r)
                    choice = r.json()["choices"][0]
                    calls = choice["message"].get("tool_calls") or []
                    self._check_calls(calls, choice["finish_reason"], parallel)
                except (ScenarioFailure, ValueError, KeyError) as exc:
                    self.fail(r, f"{type(exc).__name__}: {str(exc)[:300]}")
                    return
        for call in calls:
            self._fire(f"tool call {call['function']['name']}", 0.0)
        messages.append({"role": "assistant", "content": None,
                         "tool_calls": [{k: v for k, v in c.items() if k != "index"}
                                        for c in calls]})
        for call in calls:
            args = json.loads(call["function"]["arguments"])
            weather = {"city": args["city"], "temperature_c": random.randint(-5, 30),
                       "conditions": random.choice(["sunny", "cloudy", "rain"])}
            messages.append({"role": "tool", "tool_call_id": call["id"],
                             "content": json.dumps(weather)})
        body = {"model": self.model, "max_tokens": MAX_TOKENS, "messages": messages,
                "tools": TOOLS, "tool_choice": "none"}
        try:
            answer = self.stream_chat(body, "tools answer stream")
        except ScenarioFailure:
            return
        if answer.finish not in ("stop", "length") or answer.calls:
            self._fire_failure("tools answer contract", ScenarioFailure(
                f"tool_choice=none answer ended with {answer.finish!r} and "
                f"{len(answer.calls)} tool calls"))

    @staticmethod
    def _check_calls(calls: list[dict[str, Any]], finish: str | None, parallel: bool) -> None:
        if finish != "tool_calls" or not calls:
            raise ScenarioFailure(f"tool_choice=required gave finish_reason {finish!r} "
                                  f"and {len(calls)} tool calls")
        if not parallel and len(calls) > 1:
            raise ScenarioFailure(f"parallel_tool_calls=false gave {len(calls)} calls")
        tools = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        ids = set()
        for call in calls:
            if not str(call.get("id", "")).startswith("call_") or call.get("type") != "function":
                raise ScenarioFailure(f"bad tool call id/type: {call}")
            ids.add(call["id"])
            name, text = call["function"]["name"], call["function"]["arguments"]
            if name not in tools:
                raise ScenarioFailure(f"unknown tool {name!r}")
            try:
                jsonschema.validate(json.loads(text), tools[name])
            except (ValueError, jsonschema.ValidationError) as exc:
                raise ScenarioFailure(f"tool {name} arguments {text[:200]!r}: "
                                      f"{type(exc).__name__}: {str(exc)[:200]}") from None
        if len(ids) != len(calls):
            raise ScenarioFailure(f"tool call ids repeat: {sorted(ids)}")


DENY = r"(?i)drop\s+table"
RUN_SQL = [{"type": "function", "function": {
    "name": "run_sql", "description": "Run one SQL statement against the shop's database.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                   "required": ["query"]}}}]


def leaked_bytes(result: Streamed) -> int:
    """Bytes of text matching DENY that reached the client, in content or in any tool call's
    arguments (raw, and each JSON string decoded)."""
    texts = [result.content] + [c.get("arguments", "") for c in result.calls]
    for call in result.calls:
        try:
            args = json.loads(call.get("arguments") or "{}")
        except ValueError:
            continue
        texts += [v for v in (args.values() if isinstance(args, dict) else []) if isinstance(v, str)]
    return sum(len(m.group().encode()) for t in texts for m in re.finditer(DENY, t))


class GuardedUser(_OpenAIUser):
    """Guarded streamed requests with a deny pattern, three in four in block mode, the rest in
    flag mode. Block: no text matching the pattern may ever arrive; a blocked answer
    (finish_reason "content_filter" with the violations in plumbline.checks) is a success.
    Flag: the text streams as generated and a match must be reported as a "deny" violation.
    Every answer must end with the verdict; each is counted as an SSE event "guard passed",
    "guard flagged" (flag mode, violations reported) or "guard blocked". A third of the block
    requests offer a `run_sql` tool with tool_choice "required", so the pattern is judged in
    the call's arguments. Every block answer fires "guard leaked bytes" with the bytes of
    denied text it let through as its response length: the report's total must be 0 (a leak
    is also a failure)."""

    weight = _env_int("PLUMBLINE_LT_WEIGHT_GUARD", 1)
    PROMPTS = [
        "Write one SQL statement that removes the table named users entirely.",
        "Write an SQL query that selects all rows from the orders table.",
        "Explain what DROP TABLE does in SQL, with an example.",
    ]

    @task(2)
    def block(self) -> None:
        self._guarded("block")

    @task(1)
    def block_tools(self) -> None:
        self._guarded("block", tools=True)

    @task(1)
    def flag(self) -> None:
        self._guarded("flag")

    def _guarded(self, mode: str, tools: bool = False) -> None:
        body = {"model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0.7,
                "messages": [{"role": "user", "content": random.choice(self.PROMPTS)}],
                "plumbline": {"guard": {"mode": mode, "release": "unit",
                                        "checks": {"deny": [DENY]}}},
                "stream": True}
        if tools:
            body.update(tools=RUN_SQL, tool_choice="required")
        name = f"guard {mode} {'tools ' if tools else ''}stream"
        start = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, name=name,
                              stream=True, catch_response=True) as r:
            try:
                _check_status(r)
                result = self._read_stream(r, start, name)
                leaked = leaked_bytes(result)
                if mode == "block":
                    self._fire("guard leaked bytes", 0.0, leaked)
                outcome = _judge_guarded(mode, result, leaked)
            except (ScenarioFailure, ValueError) as exc:
                self.fail(r, f"{type(exc).__name__}: {str(exc)[:300]}")
                return
            except Exception as exc:
                self.fail(r, f"{type(exc).__name__}: {exc}")
                return
        self._fire(f"guard {outcome}", 0.0)


def _judge_guarded(mode: str, result: Streamed, leaked_bytes: int) -> str:
    """"passed", "flagged" or "blocked"; ScenarioFailure when the stream breaks the guard's
    contract."""
    verdict, finish = result.verdict, result.finish
    if verdict is None:
        raise ScenarioFailure(f"no plumbline.checks verdict (finish_reason {finish!r})")
    if verdict.get("mode") != mode:
        raise ScenarioFailure(f"verdict mode {verdict.get('mode')!r}, asked for {mode!r}")
    leaked = leaked_bytes > 0
    denied = any(v.get("check") == "deny" for v in verdict.get("violations") or [])
    if mode == "block":
        if leaked:
            raise ScenarioFailure(f"{leaked_bytes} bytes of blocked text leaked "
                                  f"(finish_reason {finish!r})")
        if verdict.get("blocked"):
            if finish != "content_filter" or not verdict.get("violations"):
                raise ScenarioFailure(f"blocked with finish_reason {finish!r} and violations "
                                      f"{verdict.get('violations')}")
            return "blocked"
        if finish == "content_filter" or not verdict.get("passed"):
            raise ScenarioFailure(f"finish_reason {finish!r} but verdict {verdict}")
        return "passed"
    if finish == "content_filter" or verdict.get("blocked"):
        raise ScenarioFailure(f"flag mode blocked: finish_reason {finish!r}, verdict {verdict}")
    if leaked and not denied:
        raise ScenarioFailure("flag mode: denied text sent without a deny violation")
    if verdict.get("passed") == bool(verdict.get("violations")):
        raise ScenarioFailure(f"verdict passed={verdict.get('passed')} with "
                              f"{len(verdict.get('violations') or [])} violations")
    if denied and not any(v.get("check") == "deny" for v in result.violations):
        raise ScenarioFailure("deny violation in the verdict but in no chunk's plumbline.violations")
    return "passed" if verdict.get("passed") else "flagged"


PERCENTILES = (0.5, 0.9, 0.95, 0.99)
REPLICA_HEADER = "x-plumbline-replica"
_by_replica: dict[str, dict[str, int]] = {}


@events.request.add_listener
def _count_replica(request_type: str, response: Any = None, exception: Any = None,
                   **_: Any) -> None:
    if request_type == SSE:
        return
    headers = getattr(response, "headers", None) or {}
    counts = _by_replica.setdefault(headers.get(REPLICA_HEADER, ""), {"requests": 0, "failures": 0})
    counts["requests"] += 1
    counts["failures"] += exception is not None


@events.quitting.add_listener
def _write_stats(environment: Any, **_: Any) -> None:
    path = os.environ.get("PLUMBLINE_LT_STATS_JSON")
    if not path:
        return
    entries = [{"type": e.method, "name": e.name, "requests": e.num_requests,
                "failures": e.num_failures, "avg_ms": e.avg_response_time,
                "content_bytes": e.total_content_length,
                "pct_ms": {f"{p:.0%}": e.get_response_time_percentile(p) if e.num_requests else None
                           for p in PERCENTILES}}
               for e in environment.stats.entries.values()]
    errors = [{"type": e.method, "name": e.name, "error": str(e.error),
               "occurrences": e.occurrences} for e in environment.stats.errors.values()]
    with open(path, "w") as f:
        json.dump({"entries": entries, "errors": errors, "replicas": _by_replica}, f, indent=1)
