"""The consistency buffer: facts from the conversation and the session, detection, enforcement."""
import asyncio
import json

import pytest
from hypothesis import given, settings, strategies as st

from gateway.guard.checks import CheckContext
from gateway.guard.facts import Assertion, AssertionBuffer, iter_leaves, validate_assertions
from gateway.guard.guard import Guard
from gateway.guard.pinning import pin_schema
from gateway.guard.pointers import JsonPointerParser
from gateway.guard.policy import merge_policy, server_policy
from gateway.guard.sessions import InMemorySessionStore

CONVERSATION = [
    {"role": "user", "content": "Look up customer AB-0001"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_customer", "arguments": '{"customer_id": "AB-0001"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"customer_id": "AB-0001", "plan": "pro", "seats": 12}'},
    {"role": "assistant", "content": '{"summary": {"plan": "pro"}, "tags": ["vip", "eu"]}'},
    {"role": "user", "content": "Now answer in JSON."},
]


def detect(buf, text, chunks=None):
    policy = merge_policy(server_policy("flag"), {"checks": {"consistency": "detect"}})
    g = Guard(policy, CheckContext(is_structured=True, assertions=buf))
    for c in chunks or [text]:
        g.feed(c)
    g.finish("stop")
    return [v for v in g.violations if v.check == "consistency"]


def test_facts_from_every_source_with_their_origin():
    buf = AssertionBuffer.from_conversation(CONVERSATION, {"/region": "eu-west"})
    assert buf.get("/customer_id").source == "tool result call_1, message 2"
    assert buf.get("/seats").value == 12
    assert buf.get("/summary/plan").source == "assistant message 3"
    assert buf.get("/tags/1").value == "eu"
    assert buf.get("/region").source == "plumbline.assertions"
    only_call = AssertionBuffer.from_conversation(CONVERSATION[:2])
    assert only_call.get("/customer_id").source.startswith("tool call get_customer (call_1)")


def test_contradiction_across_turns_names_both_values_and_the_source():
    buf = AssertionBuffer.from_conversation(CONVERSATION)
    assert detect(buf, '{"customer_id": "AB-0001", "seats": 12.0, "plan": "pro"}') == []
    text = '{"customer_id": "AB-0001", "seats": 13, "plan": "pro"}'
    [v] = detect(buf, text, chunks=[text[i:i + 3] for i in range(0, len(text), 3)])
    assert "/seats" in v.message and "13" in v.full_message and "12" in v.full_message
    assert "tool result call_1" in v.message and "13" not in v.message
    assert text[v.start:v.end] == "13"
    [v] = detect(buf, '{"seats": true}')    # true is not 1
    assert "/seats" in v.message


def test_client_declared_assertion_wins_and_is_validated():
    buf = AssertionBuffer.from_conversation(CONVERSATION, {"/plan": "basic"})
    [v] = detect(buf, '{"plan": "pro"}')
    assert "plumbline.assertions" in v.message
    with pytest.raises(ValueError, match="JSON pointer"):
        validate_assertions({"plan": "x"})
    with pytest.raises(ValueError):
        validate_assertions(["/plan"])


def test_session_store_carries_facts_across_requests_and_expires():
    now = [0.0]
    store = InMemorySessionStore(ttl_s=60, clock=lambda: now[0])
    first = AssertionBuffer.from_conversation(CONVERSATION[:3])
    asyncio.run(store.save("s1", first.facts.values()))
    # A later request in the same session, with a fresh conversation, still knows the facts.
    later = AssertionBuffer.from_conversation([{"role": "user", "content": "hi"}],
                                              session=asyncio.run(store.load("s1")))
    [v] = detect(later, '{"customer_id": "ZZ-9999"}')
    assert '"AB-0001"' in v.full_message and "tool result call_1" in v.message
    assert asyncio.run(store.load("other")) == []
    now[0] = 61.0
    assert asyncio.run(store.load("s1")) == []


def test_session_store_evicts_the_stalest_session():
    store = InMemorySessionStore(max_sessions=2)
    for sid in ("a", "b", "c"):
        asyncio.run(store.save(sid, [Assertion("/k", sid, "test")]))
    assert asyncio.run(store.load("a")) == [] and asyncio.run(store.load("c"))[0].value == "c"


def test_block_mode_withholds_the_contradicting_document():
    buf = AssertionBuffer.from_conversation(CONVERSATION)
    policy = merge_policy(server_policy("block"), {"checks": {"consistency": "detect"}})
    g = Guard(policy, CheckContext(is_structured=True, assertions=buf))
    out = g.feed('{"plan": "free"')
    assert out.blocked and out.released == ""


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False, width=32),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=15)


@settings(max_examples=200, deadline=None)
@given(value=st.dictionaries(st.text(max_size=5), json_values, max_size=5) | st.lists(json_values, max_size=5),
       cuts=st.lists(st.integers(0, 1000), max_size=15), indent=st.sampled_from([None, 2]))
def test_pointer_parser_matches_a_full_parse_under_any_chunking(value, cuts, indent):
    text = "Here you go: " + json.dumps(value, indent=indent) + " done"
    points = sorted({c % (len(text) + 1) for c in cuts})
    parser, leaves = JsonPointerParser(), []
    for a, b in zip([0, *points], [*points, len(text)]):
        leaves += parser.feed(text[a:b])
    expected = [(p, v) for p, v in iter_leaves(value) if not (isinstance(v, (dict, list)))]
    assert [(p, v) for p, v, _, _ in leaves] == expected
    for p, v, s, e in leaves:
        assert json.loads(text[s:e]) == v


SCHEMA = {"type": "object", "properties": {
    "customer_id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
    "plan": {"$ref": "#/$defs/plan"},
    "seats": {"type": "integer", "minimum": 1},
    "note": {"type": "string"}},
    "required": ["customer_id", "plan", "seats", "note"], "$defs": {"plan": {"enum": ["free", "pro"]}}}


def test_pin_schema_pins_declared_keys_only():
    pinned = pin_schema(SCHEMA, {"/customer_id": "AB-0001", "/plan": "pro", "/seats": 0,
                                 "/absent": 1, "/note/x": "y"})
    assert pinned["properties"]["customer_id"] == {"const": "AB-0001"}
    assert pinned["properties"]["plan"] == {"const": "pro"}            # through $ref
    assert pinned["properties"]["seats"] == SCHEMA["properties"]["seats"]   # 0 < minimum: not pinned
    assert "absent" not in pinned["properties"] and pinned["properties"]["note"] == {"type": "string"}
    assert SCHEMA["properties"]["customer_id"]["type"] == "string"      # input untouched
    buf = AssertionBuffer.from_conversation(CONVERSATION)
    assert pin_schema(SCHEMA, buf.facts.values())["properties"]["seats"] == {"const": 12}


def test_enforce_pinned_value_is_what_the_model_generates(tiny_model_dir):
    from engine import LLM, SamplingParams
    from grammars import GrammarSpec

    schema = {"type": "object", "properties": {"customer_id": {"type": "string", "maxLength": 8},
                                               "seats": {"type": "integer", "maximum": 99}},
              "required": ["customer_id", "seats"], "additionalProperties": False}
    pinned = pin_schema(schema, {"/customer_id": "AB-0001", "/seats": 12})
    llm = LLM(str(tiny_model_dir))
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=7,
                            grammar=GrammarSpec("json_schema", json.dumps(pinned)))
    outs = llm.generate(["Customer:", "Answer:"], params)
    for out in outs:
        value = json.loads(out.outputs[0].text)
        assert value == {"customer_id": "AB-0001", "seats": 12}
    buf = AssertionBuffer(); buf.add("/customer_id", "AB-0001", "plumbline.assertions")
    assert detect(buf, outs[0].outputs[0].text) == []
