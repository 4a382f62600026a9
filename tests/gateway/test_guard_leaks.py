"""Issue 20's leaks, one regression test each: in block mode no byte of a failing unit leaves by
any path (content, tool-call deltas, logprob tokens, verdict messages). The scripted engine of
test_guard_server plays the exact text; raw SSE bytes are searched for the withheld bytes."""
from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from gateway.guard import CheckContext, GuardedChoice, GuardPlan, InMemorySessionStore, Policy
from gateway.metrics import Metrics
from gateway.tool_calls import ToolCallDelta, ToolCallParser
from tests.gateway.test_guard_server import KEY, MODEL, ASK, ext, server, tokenizer_m  # noqa: F401

SQL = [{"type": "function", "function": {"name": "run_sql", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:   # noqa: F811
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def raw(server: Any, plumbline: dict[str, Any], **body: Any) -> tuple[bytes, list[dict[str, Any]]]:  # noqa: F811
    """The SSE body as bytes, and its JSON events."""
    request = {"model": MODEL, "messages": ASK, "stream": True, "max_tokens": 300,
               "plumbline": plumbline, **body}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=request,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        data = r.read()
    events = [json.loads(line[6:]) for line in data.decode().splitlines()
              if line.startswith("data: {")]
    return data, events


def readable(events: list[dict[str, Any]]) -> str:
    """All a client reads of the choices (content, tool-call deltas, logprob tokens and bytes,
    token ids, finish reasons) as text; the verdicts are checked on their own."""
    return json.dumps([e.get("choices") for e in events])


def verdicts(events: list[dict[str, Any]]) -> str:
    return json.dumps([e.get("plumbline") for e in events])


def block(**checks: Any) -> dict[str, Any]:
    return {"guard": {"mode": "block", "release": "stream", "checks": checks}}


def finish_and_verdict(events: list[dict[str, Any]]) -> tuple[str | None, dict[str, Any]]:
    last = [e for e in events if e.get("choices")][-1]
    return last["choices"][0]["finish_reason"], last["plumbline"]["checks"]


# 2: deny looks at tool calls, and at decoded JSON strings
def test_deny_blocks_a_tool_call_before_any_byte_of_it(server):  # noqa: F811
    server.engine.script('<tool_call>{"name": "run_sql", "arguments": '
                         '{"query": "DROP TABLE users"}}</tool_call>')
    data, events = raw(server, block(deny=[r"(?i)drop\s+table"]), tools=SQL)
    assert b"DROP" not in data and b"run_sql" not in data
    reason, verdict = finish_and_verdict(events)
    assert reason == "content_filter" and verdict["violations"][0]["check"] == "deny"


def test_deny_sees_a_json_string_through_its_escapes(server):  # noqa: F811
    server.engine.script('{"q": "DROP\\u0020TABLE users"}')
    data, events = raw(server, block(deny=[r"(?i)drop\s+table"]),
                       response_format={"type": "json_object"})
    assert b"DROP" not in data
    assert finish_and_verdict(events)[0] == "content_filter"


# 3: consistency judges a tool call before it is sent; "final" holds calls too
def test_consistency_blocks_a_contradicting_tool_call_before_it_is_sent(server):  # noqa: F811
    server.engine.script('<tool_call>{"name": "get_weather", "arguments": {"city": "Berlin"}}'
                         '</tool_call>')
    plumbline = {"assertions": {"/city": "Paris"}, **block(consistency="detect")}
    data, events = raw(server, plumbline, tools=WEATHER)
    assert b"Berlin" not in data and b"get_weather" not in data
    reason, verdict = finish_and_verdict(events)
    assert reason == "content_filter" and verdict["violations"][0]["check"] == "consistency"


def test_release_final_holds_a_passing_tool_call_to_the_end():
    policy = Policy(mode="block", release="final", checks={"tool_args": True})
    choice = GuardedChoice(GuardPlan(policy, CheckContext(tools=WEATHER), None), 0, _Runtime(),
                           "r1")
    parser = ToolCallParser()
    deltas = parser.feed('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                         '</tool_call>')
    out = choice.step("", [d for d in deltas if isinstance(d, ToolCallDelta)], (1,), (-0.1,),
                      ((),), parser, None)
    assert out.calls == () and out.token_ids == ()               # passed, but held: "final"
    out = choice.step("", [], (), (), (), parser, "tool_calls")
    assert out.calls and out.token_ids == (1,)


# 4: verdicts name the rule, never the withheld value
@pytest.mark.parametrize("script, plumbline, withheld", [
    ("Sure: 17 * 3 = 50, I think.", block(arithmetic=True), [b"17 * 3", b"= 50"]),
    ('{"customer_id": "ZZ-9999"}',
     {"assertions": {"/customer_id": "AB-0001"}, **block(consistency="detect")}, [b"ZZ-9999"]),
])
def test_block_verdicts_do_not_quote_what_they_withhold(server, script, plumbline, withheld):  # noqa: F811
    server.engine.script(script)
    data, events = raw(server, plumbline)
    for value in withheld:
        assert value not in data   # anywhere: content, tokens, verdicts
    reason, verdict = finish_and_verdict(events)
    assert reason == "content_filter" and verdict["violations"]


def test_schema_and_tool_args_verdicts_do_not_quote_values(server):  # noqa: F811
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    server.engine.script('{"n": "SEVENTEEN-X"}')
    data, events = raw(server, block(schema=True), response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert b"SEVENTEEN-X" not in data
    (v,) = finish_and_verdict(events)[1]["violations"]
    assert v["check"] == "schema" and "/n" in v["message"] and "'type'" in v["message"]
    server.engine.script('<tool_call>{"name": "get_weather", "arguments": {"city": 31337}}'
                         '</tool_call>')
    data, events = raw(server, block(tool_args=True), tools=WEATHER)
    assert b"31337" not in data
    assert finish_and_verdict(events)[0] == "content_filter"


def test_flag_mode_may_quote_what_it_already_sent(server, client):  # noqa: F811
    server.engine.script("Sure: 17 * 3 = 50, I think.")
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=300, extra_body={
        "plumbline": {"guard": {"mode": "flag", "checks": {"arithmetic": True}}}})
    assert "17 * 3 = 50" in ext(out)["checks"]["violations"][0]["message"]


# 5: the arithmetic hold-back never passes a claim it has not judged
def test_arithmetic_claim_is_held_until_judged_under_release_stream(server):  # noqa: F811
    for text in ["17 * 3 = 50, yes.", "Sure. 17 * 3 = 50; fine", "So 17 * 3 = 50."]:
        server.engine.script(text)
        data, events = raw(server, block(arithmetic=True))
        assert "17" not in readable(events) and "50" not in readable(events), text
        assert "17 * 3" not in verdicts(events) and "= 50" not in verdicts(events)
        assert finish_and_verdict(events)[0] == "content_filter"


# 7: token ids and logprobs travel with their text
def test_tokens_wait_while_a_stop_string_prefix_holds_their_text(server):  # noqa: F811
    server.engine.script("Hello there. SECRET-0042 is the code.")
    data, events = raw(server, block(deny=[r"SECRET-\d{4}"]), logprobs=True, top_logprobs=2,
                       stop=["SECRET-9999"], return_token_ids=True)
    assert "SECRET" not in readable(events) and "0042" not in readable(events)
    assert "0042" not in verdicts(events)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    tokens = "".join(t["token"] for e in events if e["choices"] and e["choices"][0].get("logprobs")
                     for t in e["choices"][0]["logprobs"]["content"])
    assert text.startswith(tokens)
    assert finish_and_verdict(events)[0] == "content_filter"


# 8: a deny pattern with no bound on its match holds the text to the end
@pytest.mark.parametrize("pattern", [r"SECRET.*leaks", r"SECRET(?= x+ leaks)", r"S.{300,400}leaks"])
def test_unbounded_deny_patterns_hold_the_text(server, pattern):  # noqa: F811
    script = "Intro. SECRET " + "x" * 320 + " leaks. Outro."
    server.engine.script(script)
    data, events = raw(server, block(deny=[pattern]))
    assert "SECRET" not in readable(events) and "xxxx" not in readable(events)
    assert finish_and_verdict(events)[0] == "content_filter"


# -- helpers for the unit test above -------------------------------------------------------------

class _Runtime:
    """What GuardedChoice reads of the runtime: metrics and the session store."""

    def __init__(self) -> None:
        self.metrics = Metrics("test")
        self.sessions = InMemorySessionStore()
