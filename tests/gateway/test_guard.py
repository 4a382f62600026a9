"""Guard semantics: off/flag/block, stream/unit/final release, and the block guarantee."""
import re

from hypothesis import HealthCheck, given, settings, strategies as st

from gateway.guard.checks import CheckContext
from gateway.guard.guard import Guard
from gateway.guard.policy import server_policy

DENY = r"SECRET-\d{4}"


def guard(mode, release="unit", events=None, context=None, **checks):
    policy = server_policy(mode, release, {"deny": [DENY], "arithmetic": True, **checks})
    return Guard(policy, context or CheckContext(),
                 on_event=(lambda name, f: events.append(name)) if events is not None else None)


def drive(g, chunks, finish_reason="stop", tool_calls=None):
    released, steps = "", []
    for c in chunks:
        step = g.feed(c)
        released += step.released
        steps.append(step)
    step = g.finish(finish_reason, tool_calls)
    released += step.released
    steps.append(step)
    return released, steps


def test_off_releases_everything_and_runs_nothing():
    g = guard("off")
    released, steps = drive(g, ["SECRET-", "1234 and 2+2=5 "])
    assert released == "SECRET-1234 and 2+2=5 " and g.checks == [] and g.verdict()["passed"]


def test_flag_releases_as_generated_and_reports_on_the_next_chunk():
    events = []
    g = guard("flag", events=events)
    chunks = ["Here: SECR", "ET-1234. More ", "text."]
    released, steps = drive(g, chunks)
    assert [s.released for s in steps[:3]] == chunks       # nothing held
    assert [v.check for v in steps[1].violations] == ["deny"]
    assert not any(s.blocked for s in steps)
    verdict = g.verdict()
    assert verdict["passed"] is False and verdict["violations"][0]["start"] == 6
    assert "check_violation" in events and "guard_finished" in events


def test_block_unit_releases_sentences_that_passed_then_stops():
    events = []
    g = guard("block", "unit", events=events)
    assert g.feed("First sentence is fine. Sec").released == ""   # deny tail not cleared yet
    s1 = g.feed("ond sentence ")
    assert s1.released == "First sentence is fine. "
    s2 = g.feed("has SECRET-0042 in it. Third is fine. ")
    assert s2.blocked and s2.released == "" and s2.violations[0].check == "deny"
    s3 = g.feed("More.")
    fin = g.finish("stop")
    assert s3.released == fin.released == "" and fin.blocked
    assert "guard_blocked" in events and g.verdict()["blocked"]


def test_block_unit_releases_a_json_value_only_when_complete_and_passing():
    ctx = CheckContext(is_structured=True)
    g = guard("block", "unit", context=ctx, truncation=False)   # truncation holds to finish
    assert g.feed('{"a": 1, ').released == ""
    assert g.feed('"b": "x"}').released == ""     # complete, but the deny tail is not cleared
    assert g.feed('\n{"c": [true, null]}').released == '{"a": 1, "b": "x"}'
    assert g.finish("stop").released == '\n{"c": [true, null]}'
    released, _ = drive(guard("block", "unit", context=ctx), ['{"a": "SECRET-1', '234"}'])
    assert released == ""


def test_block_final_holds_everything_until_finish():
    g = guard("block", "final")
    assert g.feed("A fine sentence. ").released == ""
    assert g.feed("Another one. ").released == ""
    fin = g.finish("stop")
    assert fin.released == "A fine sentence. Another one. " and not fin.blocked
    assert g.verdict()["passed"]


def test_block_schema_failure_at_finish_withholds_the_document():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    ctx = CheckContext(schema=schema, is_structured=True)
    released, steps = drive(guard("block", "unit", context=ctx), ['{"n": ', '"three"}'])
    assert released == "" and steps[-1].blocked and steps[-1].violations[0].check == "schema"
    released, steps = drive(guard("block", "unit", context=ctx), ['{"n": ', "3}"])
    assert released == '{"n": 3}' and not steps[-1].blocked


def test_block_stream_releases_what_checks_cleared():
    g = guard("block", "stream")
    text = "word " * 10
    released = "".join(g.feed(c).released for c in text)
    # The deny tail is SECRET-\d{4} wide; the rest is already out.
    assert released and text.startswith(released) and len(text) - len(released) < 12
    assert released + g.finish("stop").released == text


def test_block_tool_call_checked_before_it_is_sent():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}}]
    g = guard("block", context=CheckContext(tools=tools))
    assert not g.check_tool_call({"name": "f", "arguments": '{"x": 1}'}).blocked
    step = g.check_tool_call({"name": "f", "arguments": '{"x": "one"}'})
    assert step.blocked and step.violations[0].check == "tool_args"


def test_truncated_structured_output_blocks():
    ctx = CheckContext(is_structured=True)
    released, steps = drive(guard("block", "unit", context=ctx), ['{"a": [1, 2'], "length")
    assert released == "" and [v.check for v in steps[-1].violations] == ["truncation"]


words = st.lists(st.sampled_from(["alpha", "beta", "7", "x", ".", "!", "\n", "SECRET", "-", "12"]),
                 max_size=40)


def _chunks(text, cuts):
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=words, suffix=words, digits=st.from_regex(r"\A\d{4}\Z"),
       cuts=st.lists(st.integers(0, 10_000), max_size=30),
       release=st.sampled_from(["stream", "unit", "final"]),
       seps=st.sampled_from([" ", "", ". "]))
def test_block_guarantee_no_byte_of_a_failing_unit_is_released(prefix, suffix, digits, cuts,
                                                               release, seps):
    before = seps.join(prefix) + " "
    secret = f"SECRET-{digits}"
    text = before + secret + " " + seps.join(suffix)
    g = Guard(server_policy("block", release, {"deny": [DENY]}), CheckContext())
    released, steps = drive(g, _chunks(text, cuts))
    first = re.search(DENY, text).start()
    assert g.blocked and steps[-1].blocked and min(v.start for v in g.violations) == first
    assert text.startswith(released)
    assert len(released) <= first                      # no byte of the match
    if release == "unit":                              # nor of the sentence holding it
        unit_start = max(text.rfind("\n", 0, first), max((text.rfind(p, 0, first) for p in
                         (". ", "! ", "? ", ".\t", "!\t", "?\t")), default=-1) + 1)
        assert len(released) <= unit_start + 1
    if release == "final":
        assert released == ""


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="ab .\n1234", max_size=120), cuts=st.lists(st.integers(0, 500), max_size=20),
       release=st.sampled_from(["stream", "unit", "final"]))
def test_block_passing_text_is_released_whole_whatever_the_chunking(text, cuts, release):
    g = Guard(server_policy("block", release, {"deny": [DENY]}), CheckContext())
    released, steps = drive(g, _chunks(text, cuts))
    assert released == text and not g.blocked
