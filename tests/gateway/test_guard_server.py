"""The guard through the server: policy 400s, flag and block (streamed and not), content_filter,
consistency across turns and across a session, enforce pinning, traces and metrics.

A scripted fake engine plays whatever text a test sets, so each mode is exercised on exactly
the text that should trip it, in a few milliseconds. The SDK is the client (extra_body); raw
SSE bytes are read where the block guarantee (no failing byte ever sent) is the point.
"""
from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.gateway.conftest import FakeEngine, LiveServer, sse_events

MODEL = "smollm2-135m-instruct"
KEY = "guard-test-key"
SECRET = r"SECRET-\d{4}"
ASK = [{"role": "user", "content": "Go."}]


class ScriptedEngine(FakeEngine):
    """FakeEngine playing `script(text)`; accepts grammars (not enforced: the text is fixed)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, max_num_seqs=8, max_model_len=4096)

    def script(self, text: str) -> None:
        self.text_ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)


@pytest.fixture(scope="module")
def tokenizer_m(default_model_dir: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.fixture(scope="module")
def server(tokenizer_m: Any, tmp_path_factory: Any) -> Any:
    engine = ScriptedEngine(tokenizer_m)
    config = GatewayConfig(api_keys=(KEY,), guard_mode="flag",
                           guard_checks={"deny": [SECRET], "arithmetic": True},
                           trace_dir=str(tmp_path_factory.mktemp("traces")))
    live = LiveServer(create_app(config, engine_factory=lambda _: engine)).start()
    live.engine = engine  # type: ignore[attr-defined]
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def chat(client: openai.OpenAI, guard: dict[str, Any] | None = None, *, stream: bool = False,
         messages: list[dict[str, Any]] | None = None, **plumbline: Any) -> Any:
    ext = dict(plumbline)
    if guard is not None:
        ext["guard"] = guard
    return client.chat.completions.create(
        model=MODEL, messages=messages or ASK, stream=stream, max_tokens=200,
        extra_body={"plumbline": ext} if ext else None)


def ext(obj: Any) -> dict[str, Any]:
    return (obj.model_extra or {}).get("plumbline") or {}


def raw_stream(server: Any, guard: dict[str, Any]) -> tuple[bytes, list[Any]]:
    """The SSE body as bytes (for the no-leak assertions) and its parsed events."""
    body = {"model": MODEL, "messages": ASK, "stream": True, "max_tokens": 200,
            "plumbline": {"guard": guard}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        data = r.read()
    return data, sse_events(iter(data.decode().splitlines()))


LEAKY = "First sentence is fine. Then SECRET-0042 leaks out. More text here."


# -- policy -------------------------------------------------------------------------------------

@pytest.mark.parametrize("plumbline, param", [
    ({"guard": {"mode": "nope"}}, "plumbline.guard.mode"),
    ({"guard": {"release": "later"}}, "plumbline.guard.release"),
    ({"guard": {"checks": {"bogus": True}}}, "plumbline.guard.checks.bogus"),
    ({"guard": {"checks": {"deny": ["("]}}}, "plumbline.guard.checks.deny"),
    ({"guard": "block"}, "plumbline.guard"),
    ({"assertions": {"no_slash": 1}}, "plumbline.assertions"),
])
def test_bad_policy_is_a_400_naming_the_field(client, plumbline, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK,
                                       extra_body={"plumbline": plumbline})
    assert err.value.body["param"] == param


# -- flag -----------------------------------------------------------------------------------------

def test_flag_streams_everything_and_announces_violations(server, client):
    text = "Here: SECRET-1234. And 2 + 2 = 5 as we know. Fine."
    server.engine.script(text)
    chunks = list(chat(client, stream=True))           # flag is the server default here
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    announced = [v for c in chunks for v in ext(c).get("violations", [])]
    assert {v["check"] for v in announced} == {"deny", "arithmetic"}
    final = chunks[-1]
    assert final.choices[0].finish_reason == "stop"
    verdict = ext(final)["checks"]
    assert verdict["mode"] == "flag" and not verdict["passed"] and not verdict["blocked"]
    assert sorted(v["check"] for v in verdict["violations"]) == ["arithmetic", "deny"]


def test_flag_non_streaming_returns_the_text_and_the_verdict(server, client):
    server.engine.script(LEAKY)
    out = chat(client)
    assert out.choices[0].message.content == LEAKY and out.choices[0].finish_reason == "stop"
    assert [v["check"] for v in ext(out)["checks"]["violations"]] == ["deny"]


def test_off_is_below_this_flag_server(server, client):
    # the server's policy is a floor (tests/gateway/test_guard_floor.py); "off" runs no checks
    # where the operator allows it
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, {"mode": "off"})
    assert err.value.body["param"] == "plumbline.guard.mode"


# -- block ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("release, released", [("unit", "First sentence is fine. "),
                                               ("final", ""), ("stream", None)])
def test_block_stream_ends_with_content_filter_and_never_sends_the_secret(server, release,
                                                                          released):
    server.engine.script(LEAKY)
    data, events = raw_stream(server, {"mode": "block", "release": release})
    assert b"SECRET-0042" not in data and b"leaks" not in data
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    if released is not None:
        assert text == released
    else:   # "stream": whatever the deny check cleared, a prefix, never the match
        assert LEAKY.startswith(text) and len(text) <= LEAKY.index("SECRET")
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "content_filter"
    verdict = final["plumbline"]["checks"]
    assert verdict["blocked"] and verdict["violations"][0]["check"] == "deny"


def test_block_releases_passing_text_whole(server, client):
    text = "All is well. Nothing to see. 2 + 2 = 4."
    server.engine.script(text)
    chunks = list(chat(client, {"mode": "block", "release": "unit"}, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert ext(chunks[-1])["checks"]["passed"]


def test_block_non_streaming_is_200_with_content_null(server, client):
    server.engine.script(LEAKY)
    out = chat(client, {"mode": "block"})
    choice = out.choices[0]
    assert choice.finish_reason == "content_filter" and choice.message.content is None
    verdict = ext(out)["checks"]
    assert verdict["blocked"] and verdict["violations"][0]["check"] == "deny"


def test_block_holds_logprobs_with_their_text(server, client):
    server.engine.script(LEAKY)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, stream=True, max_tokens=200, logprobs=True,
        extra_body={"plumbline": {"guard": {"mode": "block", "release": "unit"}}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    tokens = "".join(e.token for c in chunks if c.choices and c.choices[0].logprobs
                     for e in c.choices[0].logprobs.content)
    assert text == "First sentence is fine. " and text.startswith(tokens) and "SECRET" not in tokens


def test_block_judges_each_choice_on_its_own(server, client):
    server.engine.script(LEAKY)
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=200, n=2,
        extra_body={"plumbline": {"guard": {"mode": "block"}}})
    assert [c.finish_reason for c in out.choices] == ["content_filter"] * 2
    verdicts = ext(out)["checks"]
    assert isinstance(verdicts, list) and all(v["blocked"] for v in verdicts)


def test_block_on_completions_too(server):
    server.engine.script(LEAKY)
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": MODEL, "prompt": "Go.", "max_tokens": 200,
                         "plumbline": {"guard": {"mode": "block", "release": "final"}}})
    body = r.json()
    assert r.status_code == 200 and body["choices"][0]["finish_reason"] == "content_filter"
    assert not body["choices"][0]["text"] and body["plumbline"]["checks"]["blocked"]


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}]


def test_block_withholds_a_tool_call_that_fails_and_sends_one_that_passes(server, client):
    server.engine.script('<tool_call>{"name": "get_weather", "arguments": {"town": 3}}</tool_call>')
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, tools=WEATHER, stream=True, max_tokens=200,
        extra_body={"plumbline": {"guard": {"mode": "block"}}}))
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert ext(chunks[-1])["checks"]["violations"][0]["check"] == "tool_args"
    server.engine.script('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                         '</tool_call>')
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=WEATHER, max_tokens=200,
        extra_body={"plumbline": {"guard": {"mode": "block"}}})
    (call,) = out.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert out.choices[0].finish_reason == "tool_calls" and ext(out)["checks"]["passed"]


# -- consistency ----------------------------------------------------------------------------------

def test_consistency_across_turns_names_both_values_and_the_source(server, client):
    server.engine.script('{"customer_id": "ZZ-9999", "plan": "pro"}')
    messages = [{"role": "user", "content": "Who?"},
                {"role": "assistant", "content": '{"customer_id": "AB-0001"}'},
                {"role": "user", "content": "Again, as JSON."}]
    out = chat(client, {"checks": {"consistency": "detect"}}, messages=messages)
    (v,) = ext(out)["checks"]["violations"]
    assert v["check"] == "consistency"
    assert "ZZ-9999" in v["message"] and "AB-0001" in v["message"]
    assert "assistant message 1" in v["message"]


def test_consistency_block_withholds_a_contradiction_of_a_declared_fact(server, client):
    server.engine.script('{"customer_id": "ZZ-9999"}')
    out = chat(client, {"mode": "block", "checks": {"consistency": "detect"}},
               assertions={"/customer_id": "AB-0001"})
    assert out.choices[0].finish_reason == "content_filter"
    assert "plumbline.assertions" in ext(out)["checks"]["violations"][0]["message"]


def test_consistency_across_requests_in_a_session(server, client):
    guard = {"checks": {"consistency": "detect"}}
    server.engine.script('{"order": {"id": 41, "status": "open"}}')
    first = chat(client, guard, session_id="s-1")
    assert ext(first)["checks"]["passed"]
    server.engine.script('{"order": {"id": 42, "status": "open"}}')
    second = chat(client, guard, session_id="s-1")      # no history sent: the session has it
    (v,) = ext(second)["checks"]["violations"]
    assert "/order/id" in v["message"] and first.id in v["message"]
    other = chat(client, guard, session_id="s-2")      # another session knows nothing
    assert ext(other)["checks"]["passed"]


def test_enforce_pins_asserted_keys_in_the_schema_before_it_compiles(server, client):
    schema = {"type": "object", "properties": {"customer_id": {"type": "string"},
                                               "note": {"type": "string"}},
              "required": ["customer_id", "note"]}
    server.engine.script('{"customer_id": "AB-0001", "note": "hi"}')
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        extra_body={"plumbline": {"guard": {"checks": {"consistency": "enforce"}},
                                  "assertions": {"/customer_id": "AB-0001"}}})
    spec = server.engine.requests[out.id].sampling.grammar
    pinned = json.loads(spec.source)
    assert pinned["properties"]["customer_id"] == {"const": "AB-0001"}
    assert pinned["properties"]["note"] == {"type": "string"}
    assert ext(out)["checks"]["passed"]


# -- traces and metrics ---------------------------------------------------------------------------

def test_trace_of_a_request(server, client):
    server.engine.script(LEAKY)
    out = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, max_tokens=200, extra_body={"plumbline": {"guard": {}}})
    completion = out.parse()
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(f"{server.url}/v1/traces/{completion.id}", headers=headers)
    assert r.status_code == 200
    trace = r.json()
    assert trace["id"] == completion.id and trace["prompt_ids"]
    (choice,) = trace["choices"]
    assert choice["completion_ids"] == server.engine.text_ids + [server.engine.tokenizer.eos_token_id]
    assert len(choice["logprobs"]) == len(choice["completion_ids"])
    ts = trace["timestamps"]
    assert ts["queued"] <= ts["first_token"] <= ts["finished"]
    assert trace["guard"]["mode"] == "flag"
    assert [e["event"] for e in trace["events"]] == ["check_violation", "guard_finished"]
    # the same trace under the HTTP request id
    by_header = httpx.get(f"{server.url}/v1/traces/{out.headers['x-request-id']}", headers=headers)
    assert by_header.json()["id"] == completion.id
    assert httpx.get(f"{server.url}/v1/traces/{completion.id}").status_code == 401
    assert httpx.get(f"{server.url}/v1/traces/nope", headers=headers).status_code == 404
    # --trace-dir: one JSON line per finished request
    lines = (server.runtime.traces._path).read_text().splitlines()
    assert any(json.loads(line)["id"] == completion.id for line in lines)


def test_trace_records_the_grammar(server, client):
    server.engine.script('{"a": 1}')
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=50,
                                         response_format={"type": "json_object"})
    trace = httpx.get(f"{server.url}/v1/traces/{out.id}",
                      headers={"Authorization": f"Bearer {KEY}"}).json()
    assert trace["grammar"]["kind"] == "json_object" and trace["grammar"]["compile_ms"] == 2.0
    # the fake engine has no compiler to replay the mask with
    assert trace["grammar"]["allowed_token_counts"] is None


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_checks_blocks_and_conflicts(server, client):
    before = httpx.get(server.url + "/metrics").text
    server.engine.script(LEAKY)
    chat(client, {"mode": "block"})
    server.engine.script('{"customer_id": "ZZ-9999"}')
    chat(client, {"checks": {"consistency": "detect"}}, assertions={"/customer_id": "AB-0001"})
    after = httpx.get(server.url + "/metrics").text

    def delta(name: str, **labels: str) -> float:
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert delta("plumbline:checks_run_total", check="deny") == 2
    assert delta("plumbline:checks_failed_total", check="deny") == 1
    assert delta("plumbline:checks_failed_total", check="consistency") == 1
    assert delta("plumbline:guard_blocked_total") == 1
    assert delta("plumbline:consistency_conflicts_total") == 1


# -- server defaults from the command line --------------------------------------------------------

def test_cli_guard_options(tmp_path):
    import argparse

    from gateway.cli import _add_serve, config_from_args, main

    checks = tmp_path / "checks.toml"
    checks.write_text('deny = ["(?i)drop\\\\s+table"]\narithmetic = true\n')
    parser = argparse.ArgumentParser()
    _add_serve(parser.add_subparsers())
    args = parser.parse_args(["serve", "--guard-mode", "block", "--guard-release", "final",
                              "--checks-config", str(checks), "--trace-dir", str(tmp_path),
                              "--max-traces", "10", "--session-ttl", "60"])
    config = config_from_args(args)
    policy = config.guard_policy()
    assert (policy.mode, policy.release) == ("block", "final")
    assert policy.checks["deny"] == [r"(?i)drop\s+table"] and policy.checks["arithmetic"] is True
    assert config.trace_dir == str(tmp_path) and config.max_traces == 10
    bad = tmp_path / "bad.json"
    bad.write_text('{"bogus": true}')
    assert main(["serve", "--checks-config", str(bad)]) == 2       # message, no traceback


# -- the real engine on a tiny random model: the mask itself enforces, the trace replays it -------

def test_enforce_through_a_real_engine_and_the_allowed_token_counts(tiny_model_dir):
    from engine import EngineConfig

    config = GatewayConfig(engine=EngineConfig(model=str(tiny_model_dir), max_num_seqs=2,
                                               kv_cache_memory_mb=16), traces=True)
    live = LiveServer(create_app(config)).start()
    try:
        schema = {"type": "object", "properties": {
            "customer_id": {"type": "string", "maxLength": 8},
            "seats": {"type": "integer", "maximum": 99}},
            "required": ["customer_id", "seats"], "additionalProperties": False}
        body = {"model": str(tiny_model_dir), "prompt": "Customer:", "max_tokens": 60,
                "temperature": 1.0, "seed": 7,
                "structured_outputs": {"json": schema},
                "plumbline": {"guard": {"mode": "block", "checks": {"consistency": "enforce"}},
                              "assertions": {"/customer_id": "AB-0001", "/seats": 12}}}
        out = httpx.post(live.url + "/v1/completions", json=body, timeout=120).json()
        choice = out["choices"][0]
        assert json.loads(choice["text"]) == {"customer_id": "AB-0001", "seats": 12}
        assert out["plumbline"]["checks"]["passed"]
        trace = httpx.get(f"{live.url}/v1/traces/{out['id']}", timeout=60).json()
        assert trace["guard"]["pinned"] and trace["grammar"]["backend"] == "llguidance"
        (counts,) = trace["grammar"]["allowed_token_counts"]
        ids = trace["choices"][0]["completion_ids"]
        assert 1 <= len(counts) <= len(ids) and all(c >= 1 for c in counts)
        assert min(counts) == 1       # pinned: at some step exactly one token fits
    finally:
        live.stop()
