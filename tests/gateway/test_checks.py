"""Every built-in check both ways, and policy merging/validation."""
import json

import pytest

from gateway.guard.checks import (CHECKS, Check, CheckContext, Violation, build_checks,
                                  register_check)
from gateway.guard.facts import AssertionBuffer
from gateway.guard.policy import PolicyError, merge_policy, server_policy

SCHEMA = {"type": "object", "properties": {"email": {"type": "string", "format": "email"},
                                           "n": {"type": "integer"}},
          "required": ["email", "n"]}
TOOLS = [{"type": "function", "function": {"name": "get_customer", "parameters": {
    "type": "object", "properties": {"customer_id": {"type": "string"}}, "required": ["customer_id"]}}}]


def run(config, text, chunks=None, finish_reason="stop", **ctx):
    context = CheckContext(**ctx)
    checks = build_checks(config, context)
    found = []
    for chunk in chunks or [text]:
        for c in checks:
            found += c.feed(chunk)
    final = CheckContext(**{**ctx, "finish_reason": finish_reason,
                            "tool_calls": ctx.get("tool_calls", [])})
    for c in checks:
        found += c.finish(text, final)
    return found


def test_schema_passes_and_fails_with_formats_and_location():
    assert run({"schema": True}, '{"email": "a@b.co", "n": 3}', schema=SCHEMA) == []
    text = '{"email": "not-an-email", "n": 3}'
    [v] = run({"schema": True}, text, schema=SCHEMA)
    assert v.check == "schema" and "/email" in v.message
    assert text[v.start:v.end] == '"not-an-email"'
    [v] = run({"schema": True}, '{"email": "a@b.co"}', schema=SCHEMA)
    assert "'n' is a required property" in v.full_message and "'required'" in v.message
    [v] = run({"schema": True}, '{"email": ', schema=SCHEMA)
    assert "not valid JSON" in v.message


def test_tool_args_both_ways():
    ok = [{"name": "get_customer", "arguments": '{"customer_id": "AB-1"}'}]
    assert run({"tool_args": True}, "", tools=TOOLS, tool_calls=ok) == []
    bad = [{"name": "get_customer", "arguments": '{"customer_id": 5}'},
           {"name": "nope", "arguments": "{}"},
           {"name": "get_customer", "arguments": '{"customer_id": '}]
    msgs = [v.full_message for v in run({"tool_args": True}, "", tools=TOOLS, tool_calls=bad)]
    assert len(msgs) == 3
    assert "5 is not of type 'string'" in msgs[0] and "'nope' does not exist" in msgs[1]
    assert "not valid JSON" in msgs[2]


def test_truncation_both_ways():
    assert run({"truncation": True}, '{"a": 1}', is_structured=True) == []
    assert run({"truncation": True}, "plain text", finish_reason="length") == []
    [v] = run({"truncation": True}, '{"a": ', is_structured=True, finish_reason="length")
    assert v.check == "truncation" and "max_tokens" in v.message
    calls = [{"name": "get_customer", "arguments": '{"cust'}]
    [v] = run({"truncation": True}, "", finish_reason="length", tool_calls=calls)
    assert "tool call" in v.message


@pytest.mark.parametrize("cut", range(1, 20))
def test_deny_finds_a_match_across_any_chunk_boundary(cut):
    text = "run: DROP   TABLE users;"
    found = run({"deny": [r"(?i)drop\s+table"]}, text, chunks=[text[:cut], text[cut:]])
    assert len(found) == 1
    assert text[found[0].start:found[0].end].lower().startswith("drop")


def test_deny_passes_clean_text_and_unbounded_pattern_found_at_finish():
    assert run({"deny": [r"sk-[A-Za-z0-9]{20}"]}, "nothing secret here") == []
    text = "a" + "x" * 600 + "b"
    chunks = [text[i:i + 7] for i in range(0, len(text), 7)]
    assert len(run({"deny": ["a.*b"]}, text, chunks=chunks)) == 1


@pytest.mark.parametrize("text", ["So 17 * 3 = 51.", "12+5=17", "100 / 4 = 25", "0.5 * 4 = 2",
                                  "10 / 3 = 3.33", "7 - 10 = -3", "2 x 3 = 6"])
def test_arithmetic_right_claims_pass(text):
    assert run({"arithmetic": True}, text) == []


@pytest.mark.parametrize("text,claim", [("So 17 * 3 = 52.", "17 * 3 = 52"), ("12+5=18 ok", "12+5=18"),
                                        ("100 / 4 = 24", "100 / 4 = 24"), ("1.5 + 1.5 = 3.5", "1.5 + 1.5 = 3.5")])
def test_arithmetic_wrong_claims_fail_with_location(text, claim):
    [v] = run({"arithmetic": True}, text, chunks=list(text))   # one character at a time
    assert text[v.start:v.end] == claim


@pytest.mark.parametrize("text", ["released 2024-01-05 = today", "version 1.2.3+4=5 build",
                                  "on 1/2/2024 = Tuesday", "x=3-1=7", "ratio 3x4=13 px",
                                  "2^3 = 9"])
def test_arithmetic_ignores_dates_versions_and_non_claims(text):
    assert run({"arithmetic": True}, text) == []


def test_consistency_detect_both_ways():
    buf = AssertionBuffer()
    buf.add("/customer_id", "AB-0001", "plumbline.assertions")
    assert run({"consistency": "detect"}, '{"customer_id": "AB-0001"}', assertions=buf) == []
    text = '{"customer_id": "AB-0002", "x": 1}'
    [v] = run({"consistency": "detect"}, text, chunks=list(text), assertions=buf)
    assert '"AB-0002"' in v.full_message and '"AB-0001"' in v.full_message
    assert "plumbline.assertions" in v.message and "AB-0002" not in v.message   # block: no value
    assert text[v.start:v.end] == '"AB-0002"'
    calls = [{"name": "get_customer", "arguments": '{"customer_id": "ZZ-9"}'}]
    [v] = run({"consistency": "detect"}, "", assertions=buf, tool_calls=calls)
    assert "tool get_customer" in v.full_message and "get_customer" not in v.message


def test_registry_accepts_new_checks():
    @register_check("shout")
    class Shout(Check):
        def feed(self, chunk):
            self.length += len(chunk)
            return [Violation("shout", "caps", 0, 1)] if chunk.isupper() else []
    try:
        assert [c.name for c in build_checks({"shout": True})] == ["shout"]
        assert run({"shout": True}, "HEY")[0].check == "shout"
    finally:
        CHECKS.pop("shout")   # a registered check's setting is taken as given


def test_policy_merge_and_errors():
    server = server_policy("flag", "unit", {"deny": ["secret"]})
    p = merge_policy(server, {"mode": "block", "release": "final",
                              "checks": {"deny": ["(?i)drop\\s+table"], "consistency": "enforce"}})
    assert (p.mode, p.release, p.consistency_mode) == ("block", "final", "enforce")
    assert p.checks["deny"] == ["secret", "(?i)drop\\s+table"] and p.checks["schema"] is True
    assert merge_policy(server, None) is server
    for override, param in [({"mode": "loud"}, "plumbline.guard.mode"),
                            ({"release": "soon"}, "plumbline.guard.release"),
                            ({"checks": {"nope": True}}, "plumbline.guard.checks.nope"),
                            ({"checks": {"deny": ["("]}}, "plumbline.guard.checks.deny"),
                            ({"checks": {"schema": "yes"}}, "plumbline.guard.checks.schema"),
                            ({"checks": {"consistency": "maybe"}}, "plumbline.guard.checks.consistency"),
                            ({"colour": 1}, "plumbline.guard.colour"),
                            ("block", "plumbline.guard")]:
        with pytest.raises(PolicyError) as e:
            merge_policy(server, override)
        assert e.value.param == param


def test_policy_floor():
    server = server_policy("block", "unit", {"deny": ["secret"], "consistency": "detect"})
    for override, param in [({"mode": "off"}, "plumbline.guard.mode"),
                            ({"mode": "flag"}, "plumbline.guard.mode"),
                            ({"release": "stream"}, "plumbline.guard.release"),
                            ({"checks": {"deny": False}}, "plumbline.guard.checks.deny"),
                            ({"checks": {"truncation": False}}, "plumbline.guard.checks.truncation"),
                            ({"checks": {"consistency": False}},
                             "plumbline.guard.checks.consistency")]:
        with pytest.raises(PolicyError) as e:
            merge_policy(server, override)
        assert e.value.param == param
        merge_policy(server, override, may_loosen=True)      # the operator allows it
    assert merge_policy(server, {"checks": {"deny": False}}, may_loosen=True).checks["deny"] == []
    tight = merge_policy(server, {"release": "final", "checks": {"deny": ["x"], "arithmetic": True,
                                                                  "consistency": "enforce"}})
    assert tight.checks["deny"] == ["secret", "x"] and tight.release == "final"
    # a server that runs nothing is no floor; a flag server's release shapes nothing
    off = server_policy("off", "final", {"deny": ["secret"]})
    assert merge_policy(off, {"mode": "flag", "checks": {"deny": False}}).checks["deny"] == []
    flag = server_policy("flag", "final")
    assert merge_policy(flag, {"mode": "block", "release": "stream"}).release == "stream"


def test_schema_checks_date_time_format():
    schema = {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"}}}
    assert run({"schema": True}, '{"at": "2024-05-01T10:00:00Z"}', schema=schema) == []
    [v] = run({"schema": True}, '{"at": "yesterday"}', schema=schema)
    assert "date-time" in v.full_message and "'format'" in v.message and "yesterday" not in v.message
