"""Locust scenarios for plumbline's OpenAI-compatible API.

Run headless through `python -m loadtests.run`, or directly:
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

Each user class has a weight read from the environment (0 leaves it out of a mixed run) and the
scenarios share a few knobs; this module is the only one of loadtests/ that reads them:

    PLUMBLINE_LT_MODEL          model id sent in requests (default: the server's first model)
    PLUMBLINE_LT_MAX_TOKENS     max_tokens for free-text answers (default 64)
    PLUMBLINE_LT_WEIGHT_<NAME>  weight of a user class, NAME one of CHAT, PLAIN, JSON, TOOLS, GUARD
    PLUMBLINE_LT_STATS_JSON     where to write the final statistics as JSON when Locust quits
                                (its CSV can be written before the last users finish)

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
from typing import Any

import jsonschema
from locust import HttpUser, between, events, task

from loadtests.sse import sse_events

SSE = "SSE"        # request_type of the measurement events, never an HTTP method


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

    def _fire(self, name: str, seconds: float) -> None:
        self.environment.events.request.fire(
            request_type=SSE, name=name, response_time=seconds * 1000.0, response_length=0,
            exception=None, context={})

    def post_json(self, path: str, body: dict[str, Any], name: str) -> dict[str, Any] | None:
        """POST a non-streaming request; the parsed body, or None after recording a failure."""
        with self.client.post(path, json=body, name=name, catch_response=True) as r:
            try:
                _check_status(r)
                return r.json()
            except (ScenarioFailure, ValueError) as exc:
                self.fail(r, str(exc))
                return None

    def stream_chat(self, body: dict[str, Any], name: str) -> tuple[str, str | None, dict[str, Any]]:
        """Stream a chat completion: (content, finish_reason, last chunk). Raises ScenarioFailure;
        the caller's `catch_response` block turns it into a Locust failure."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, name=name, stream=True,
                              catch_response=True) as r:
            try:
                _check_status(r)
                content, finish, last = self._read_stream(r, start, name)
            except ScenarioFailure as exc:
                self.fail(r, str(exc))
                raise
            except Exception as exc:           # a connection cut mid-stream, bad JSON
                self.fail(r, f"{type(exc).__name__}: {exc}")
                raise ScenarioFailure(str(exc)) from exc
            r.success()
            return content, finish, last

    def _read_stream(self, r: Any, start: float, name: str) -> tuple[str, str | None, dict[str, Any]]:
        parts: list[str] = []
        finish: str | None = None
        last: dict[str, Any] = {}
        previous: float | None = None
        done = False
        for data in sse_events(r.iter_lines(chunk_size=None)):
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise ScenarioFailure(f"error chunk: {chunk['error']}")
            last = chunk
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
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        if not done:
            raise ScenarioFailure("stream ended without [DONE]")
        if finish is None:
            raise ScenarioFailure("stream sent no finish_reason")
        # Locust timed the headers; the HTTP entry of a stream should time the whole response
        r.request_meta["response_time"] = (time.perf_counter() - start) * 1000.0
        return "".join(parts), finish, last


class StreamingChatUser(_OpenAIUser):
    """Streaming chat over SSE: the everyday chat-UI load."""

    weight = _env_int("PLUMBLINE_LT_WEIGHT_CHAT", 4)

    @task
    def chat(self) -> None:
        body = {"model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0.7,
                "messages": [{"role": "user", "content": random.choice(PROMPTS)}]}
        try:
            content, finish, last = self.stream_chat(body, "chat stream")
        except ScenarioFailure:
            return
        usage = last.get("usage") or {}
        if usage.get("completion_tokens", 0) > MAX_TOKENS or finish not in ("stop", "length"):
            self.environment.events.request.fire(
                request_type=SSE, name="chat stream contract", response_time=0.0,
                response_length=0, context={},
                exception=ScenarioFailure(f"finish_reason {finish!r}, usage {usage}"))


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
                content, finish, _ = self._read_stream(r, start, "json_schema stream")
                if finish != "stop":
                    raise ScenarioFailure(f"structured output ended with {finish!r} (truncated?)")
                jsonschema.validate(json.loads(content), WEATHER_SCHEMA)
            except (ScenarioFailure, ValueError, jsonschema.ValidationError) as exc:
                self.fail(r, f"{type(exc).__name__}: {str(exc)[:300]}")
            except Exception as exc:
                self.fail(r, f"{type(exc).__name__}: {exc}")


TOOLS = [{
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
    """An agent loop: the model calls a tool, gets its result, then answers in text."""

    weight = _env_int("PLUMBLINE_LT_WEIGHT_TOOLS", 1)

    @task
    def agent_turn(self) -> None:
        city = random.choice(CITIES)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a helpful assistant. Use tools when useful."},
            {"role": "user", "content": f"What's the weather like in {city} right now?"}]
        body = {"model": self.model, "max_tokens": 96, "messages": messages, "tools": TOOLS,
                "tool_choice": "required"}
        with self.client.post("/v1/chat/completions", json=body, name="tools call",
                              catch_response=True) as r:
            try:
                _check_status(r)
                message = r.json()["choices"][0]["message"]
                finish = r.json()["choices"][0]["finish_reason"]
                calls = message.get("tool_calls") or []
                if finish != "tool_calls" or not calls:
                    raise ScenarioFailure(f"tool_choice=required gave finish_reason {finish!r} "
                                          f"and {len(calls)} tool calls")
                call = calls[0]
                if call["function"]["name"] != "get_weather":
                    raise ScenarioFailure(f"unknown tool {call['function']['name']!r}")
                args = json.loads(call["function"]["arguments"])
                jsonschema.validate(args, TOOLS[0]["function"]["parameters"])
            except (ScenarioFailure, ValueError, KeyError, jsonschema.ValidationError) as exc:
                self.fail(r, f"{type(exc).__name__}: {str(exc)[:300]}")
                return
        result = {"city": args["city"], "temperature_c": random.randint(-5, 30),
                  "conditions": random.choice(["sunny", "cloudy", "rain"])}
        messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)}]
        body = {"model": self.model, "max_tokens": MAX_TOKENS, "messages": messages,
                "tools": TOOLS, "tool_choice": "none"}
        try:
            content, finish, _ = self.stream_chat(body, "tools answer stream")
        except ScenarioFailure:
            return
        if finish not in ("stop", "length"):
            self.environment.events.request.fire(
                request_type=SSE, name="tools answer finish", response_time=0.0,
                response_length=0, context={},
                exception=ScenarioFailure(f"answer ended with {finish!r}"))


DENY = r"(?i)drop\s+table"


class GuardedUser(_OpenAIUser):
    """Guarded requests in block mode: no text matching the deny pattern may ever arrive. A
    blocked answer (finish_reason content_filter) is a success; a leaked match is a failure."""

    weight = _env_int("PLUMBLINE_LT_WEIGHT_GUARD", 1)
    PROMPTS = [
        "Write one SQL statement that removes the table named users entirely.",
        "Write an SQL query that selects all rows from the orders table.",
        "Explain what DROP TABLE does in SQL, with an example.",
    ]

    @task
    def guarded(self) -> None:
        body = {"model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0.7,
                "messages": [{"role": "user", "content": random.choice(self.PROMPTS)}],
                "plumbline": {"guard": {"mode": "block", "release": "unit",
                                        "checks": {"deny": [DENY]}}},
                "stream": True}
        start = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, name="guard block stream",
                              stream=True, catch_response=True) as r:
            try:
                _check_status(r)
                content, finish, last = self._read_stream(r, start, "guard block stream")
                if re.search(DENY, content):
                    raise ScenarioFailure(f"blocked text leaked (finish_reason {finish!r})")
                if finish == "content_filter" and not (last.get("plumbline") or {}).get("checks"):
                    raise ScenarioFailure("content_filter without the violations in plumbline.checks")
            except (ScenarioFailure, ValueError) as exc:
                self.fail(r, f"{type(exc).__name__}: {str(exc)[:300]}")
                return
            except Exception as exc:
                self.fail(r, f"{type(exc).__name__}: {exc}")
                return
        self._fire("guard blocked" if finish == "content_filter" else "guard passed", 0.0)


PERCENTILES = (0.5, 0.9, 0.95, 0.99)


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
        json.dump({"entries": entries, "errors": errors}, f, indent=1)
