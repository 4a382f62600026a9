"""A property of the whole guard (issue 20): in block mode, no byte of a failing unit is readable
by the client, whatever the violation, the chunking, the release mode, and with or without tools.

Each example plants one violation (or none) in an output made of harmless sentences, cuts it
into random chunks (each chunk one "token"), and drives one choice's guard the way
`Generation.updates` does: the tool-call parser splits content from call deltas, and
`GuardedChoice.step` says what may leave. What the client could read is everything released:
content, call deltas (names and argument fragments), the text behind every released token, and
every verdict message. The planted unit's marker must appear nowhere in it; a clean output must
come out whole. `PLUMBLINE_GUARD_EXAMPLES=5000` runs the long version.
"""
from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.generation import _split
from gateway.guard import AssertionBuffer, CheckContext, GuardedChoice, GuardPlan, Policy
from gateway.guard import InMemorySessionStore
from gateway.metrics import Metrics
from gateway.tool_calls import ToolCallParser

EXAMPLES = int(os.environ.get("PLUMBLINE_GUARD_EXAMPLES", "60"))
FILLER = ["All is well. ", "The sky is blue today.\n", "We met at noon; it went fine. ",
          "Numbers like 2 + 2 = 4 are right. ", "Nothing else to add. "]
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "properties": {key: {"type": "string"}}, "required": [key]}}}
    for name, key in (("run_sql", "query"), ("get_customer", "customer_id"))]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "note": {"type": "string"},
                                           "customer_id": {"type": "string"}}}
CHECKS = {"deny": [r"QZXJ-\d{4}", r"(?i)drop\s{1,4}table"], "arithmetic": True,
          "consistency": "detect", "schema": True, "tool_args": True, "truncation": True}

# kind -> (the output, the marker of the failing unit, is_json, uses_tools, finish reason). The
# marker must not be sent at all (content, calls, tokens); verdicts, which may name a deny
# pattern, must not hold the planted value whole (VALUES).
PLANTS: dict[str, tuple[str, str, bool, bool, str]] = {
    "deny_text": ("Here: QZXJ-4242 is it. ", "QZXJ", False, False, "stop"),
    "arithmetic": ("So 1717 * 3 = 5050, done. ", "1717", False, False, "stop"),
    "deny_tool": ('<tool_call>{"name": "run_sql", "arguments": {"query": "DROP TABLE t"}}'
                  "</tool_call>", "DROP", False, True, "stop"),
    "consistency_tool": ('<tool_call>{"name": "get_customer", "arguments": '
                         '{"customer_id": "ZZ-9999"}}</tool_call>', "ZZ-9999", False, True, "stop"),
    "deny_json_string": ('{"note": "QZXJ\\u002d4242"}', "QZXJ", True, False, "stop"),
    "consistency_json": ('{"customer_id": "ZZ-9999"}', "ZZ-9999", True, False, "stop"),
    "schema": ('{"n": "SEVENTEEN"}', "SEVENTEEN", True, False, "stop"),
    "truncation": ('{"n": 1, "note": "TRUNCATED', "TRUNCATED", True, False, "length"),
}


VALUES = {"deny_text": "QZXJ-4242", "arithmetic": "1717 * 3", "deny_tool": "DROP TABLE",
          "consistency_tool": "ZZ-9999", "deny_json_string": "4242", "consistency_json": "ZZ-9999",
          "schema": "SEVENTEEN", "truncation": "TRUNCATED"}


class _Runtime:
    def __init__(self) -> None:
        self.metrics = Metrics("test")
        self.sessions = InMemorySessionStore()


def run_choice(text: str, cuts: list[int], release: str, is_json: bool, uses_tools: bool,
               finish: str) -> tuple[str, str, bool, str]:
    """(what was sent, the verdicts, blocked, the content released) for one choice."""
    facts = AssertionBuffer()
    facts.add("/customer_id", "AB-0001", "plumbline.assertions")
    context = CheckContext(schema=SCHEMA if is_json else None, tools=TOOLS if uses_tools else [],
                           is_structured=is_json, assertions=facts)
    choice = GuardedChoice(GuardPlan(Policy("block", release, CHECKS), context), 0, _Runtime(),
                           "r")
    parser = ToolCallParser() if uses_tools else None
    bounds = [0] + sorted(set(cuts)) + [len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    sent, verdicts, content, blocked = [], [], [], False
    for i, piece in enumerate(pieces):
        final = i == len(pieces) - 1
        calls: tuple[Any, ...] = ()
        if parser is not None:
            piece, calls = _split(parser.feed(piece) + (parser.finish() if final else []))
        reason = None
        if final:
            reason = parser.finish_reason(finish) if parser is not None else finish
        out = choice.step(piece, calls, (i,), (-0.5,), ((),), parser, reason)
        content.append(out.text)
        sent.append(out.text)
        sent += [f"{c.name or ''}{c.arguments}" for c in out.calls]
        sent += [pieces[t] for t in out.token_ids]          # a token names its text
        verdicts.append(json.dumps(out.violations) + json.dumps(out.verdict))
        blocked = blocked or out.blocked
        if out.blocked:
            break
    return "".join(sent), "".join(verdicts), blocked, "".join(content)


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from([*PLANTS, "clean"]), release=st.sampled_from(["stream", "unit", "final"]),
       before=st.lists(st.sampled_from(FILLER), max_size=3),
       after=st.lists(st.sampled_from(FILLER), max_size=3), data=st.data())
def test_no_byte_of_a_failing_unit_is_readable(kind: str, release: str, before: list[str],
                                              after: list[str], data: st.DataObject) -> None:
    if kind == "clean":
        text, marker, is_json, uses_tools, finish = "".join(before + after) or "Fine. ", "", False, False, "stop"
    else:
        plant, marker, is_json, uses_tools, finish = PLANTS[kind]
        # JSON output is one document; free text may surround text plants and precede calls
        text = plant if is_json else "".join(before) + plant + ("" if uses_tools else "".join(after))
    cuts = data.draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=len(text) // 2),
                     label="cuts")
    sent, verdicts, blocked, content = run_choice(text, cuts, release, is_json, uses_tools, finish)
    if kind == "clean":
        assert not blocked and content == text
    else:
        assert blocked, (kind, release)
        assert marker not in sent, (kind, release, sent)
        assert VALUES[kind] not in verdicts, (kind, verdicts)
