"""The incremental tool-call parser: deltas, content without markup, streamed == whole."""
from __future__ import annotations

import itertools
import json
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.tool_calls import (
    ContentDelta,
    Delta,
    ParsedToolCall,
    ToolCallDelta,
    ToolCallParser,
    deltas_to_openai,
    parse_tool_calls,
)
from grammars.tools import CLOSE_TAG, OPEN_TAG, format_tool_call


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def stream(text: str, cuts: list[int]) -> tuple[list[Delta], ToolCallParser]:
    parser = ToolCallParser(id_factory=ids())
    deltas: list[Delta] = []
    start = 0
    for cut in sorted(set(cuts)) + [len(text)]:
        deltas += parser.feed(text[start:cut])
        start = cut
    deltas += parser.finish()
    return deltas, parser


def replay(deltas: list[Delta]) -> tuple[str | None, list[ParsedToolCall]]:
    """Rebuild (content, calls) from deltas alone, as an OpenAI client would."""
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta)) or None
    calls: list[ParsedToolCall] = []
    for d in deltas:
        if isinstance(d, ToolCallDelta):
            if d.id is not None:
                assert d.index == len(calls) and d.name and d.arguments == ""
                calls.append(ParsedToolCall(d.id, d.name))
            else:
                calls[d.index].arguments += d.arguments
    return content, calls


WEATHER = format_tool_call("get_weather", '{"city": "Paris", "unit": "celsius"}')
NESTED = format_tool_call("add", '{"a": 1.5, "b": [2, {"x": "}\\"]{"}], "c": null}')


def test_plain_text_passes_through() -> None:
    assert parse_tool_calls("Hello, world.\n") == ("Hello, world.\n", [])


def test_single_call() -> None:
    content, calls = parse_tool_calls(WEATHER, ids())
    assert content is None
    assert [c.to_openai() for c in calls] == [{"id": "call_0", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]
    assert calls[0].is_complete


def test_text_then_parallel_calls() -> None:
    content, calls = parse_tool_calls("Let me look.\n" + WEATHER + "\n" + NESTED, ids())
    assert content == "Let me look."
    assert [c.name for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[1].arguments) == {"a": 1.5, "b": [2, {"x": '}"]{'}], "c": None}


def test_first_delta_then_fragments() -> None:
    deltas, _ = stream(WEATHER, list(range(len(WEATHER))))
    first = deltas[0]
    assert isinstance(first, ToolCallDelta)
    assert first.to_openai() == {"index": 0, "id": "call_0", "type": "function",
                                 "function": {"name": "get_weather", "arguments": ""}}
    rest = deltas[1:]
    assert all(isinstance(d, ToolCallDelta) and d.id is None for d in rest)
    assert "".join(d.arguments for d in rest if isinstance(d, ToolCallDelta)) == '{"city": "Paris", "unit": "celsius"}'
    assert deltas_to_openai(rest[:1]) == [{"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}]


def test_template_style_whitespace_and_key_order() -> None:
    text = f'{OPEN_TAG}\n{{"arguments": {{"x": 1}}, "name": "f"}}\n{CLOSE_TAG}'
    content, calls = parse_tool_calls(text, ids())
    assert content is None and calls[0].name == "f" and calls[0].arguments == '{"x": 1}'


def test_call_without_arguments_gets_empty_object() -> None:
    _, calls = parse_tool_calls(f'{OPEN_TAG}{{"name": "ping"}}{CLOSE_TAG}')
    assert calls[0].arguments == "{}"


def test_truncated_call_is_kept_incomplete() -> None:
    content, calls = parse_tool_calls('Sure. <tool_call>{"name": "f", "arguments": {"x": "ab')
    assert content == "Sure."
    assert calls[0].arguments == '{"x": "ab' and not calls[0].is_complete


def test_unnamed_call_and_partial_tag_never_reach_content() -> None:
    assert parse_tool_calls('Hi <tool_call>{"na') == ("Hi", [])
    assert parse_tool_calls("Hi <tool_ca") == ("Hi <tool_ca", [])  # not a tag after all
    deltas, _ = stream("Hi <tool_call>{", [4, 6, 9])
    assert all(OPEN_TAG[:2] not in d.text for d in deltas if isinstance(d, ContentDelta))


def test_finish_reason() -> None:
    parser = ToolCallParser()
    parser.feed(WEATHER)
    parser.finish()
    assert parser.finish_reason("stop") == "tool_calls"
    assert parser.finish_reason("length") == "length"
    plain = ToolCallParser()
    plain.feed("hi")
    plain.finish()
    assert plain.finish_reason("stop") == "stop"


# Texts the grammar can produce (auto mode: free text without the tag, then calls), plus
# template-style variants; the parser must agree with itself however the text is cut.
_free_text = st.text(alphabet=st.sampled_from(list("ab <>/_{}\"\\\n tool_call")), max_size=30).filter(
    lambda s: OPEN_TAG not in s)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from(list('ab{}[]",:\\<> \n')) | st.characters(), max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8)
_call = st.builds(lambda name, args: (name, json.dumps(args, ensure_ascii=False)),
                  st.from_regex(r"[a-zA-Z0-9_-]{1,12}", fullmatch=True),
                  st.dictionaries(st.text(max_size=6), _json_value, max_size=4))


@st.composite
def _generated(draw: st.DrawFn) -> tuple[str, str, list[tuple[str, str]]]:
    prefix = draw(_free_text)
    calls = draw(st.lists(_call, max_size=3))
    text = prefix + ("\n" if calls and draw(st.booleans()) else "") + "\n".join(
        format_tool_call(n, a) for n, a in calls)
    return text, prefix, calls


@settings(max_examples=300, deadline=None)
@given(_generated(), st.data())
def test_streamed_equals_whole_under_any_chunking(generated: tuple[str, str, list[tuple[str, str]]],
                                                  data: st.DataObject) -> None:
    text, prefix, expected_calls = generated
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    deltas, parser = stream(text, cuts)
    content, calls = parse_tool_calls(text, ids())
    assert (parser.content, parser.tool_calls) == (content, calls)
    replayed_content, replayed_calls = replay(deltas)
    assert replayed_content == content
    assert [c.to_openai() for c in replayed_calls] == [c.to_openai() for c in calls]
    assert [(c.name, c.arguments) for c in calls] == expected_calls
    assert all(c.is_complete for c in calls)
    if expected_calls:
        assert content == (prefix.rstrip(" \t\r\n") or None)
    else:
        assert content == (prefix or None)
    for d in deltas:
        if isinstance(d, ContentDelta):
            assert OPEN_TAG not in d.text


@pytest.mark.parametrize("text, is_cut", [
    ("Just text, with {braces} and <tool_ca", False),
    (WEATHER, False),
    (WEATHER + "\n", False),                                  # between parallel calls
    ("Sure. " + WEATHER + "\n" + WEATHER, False),
    ('Sure. <tool_call>{"name": "get_weather", "arguments": {"ci', True),   # a named call cut
    ('<tool_call>{"na', True),                                # cut before its name
    (WEATHER[:-len(CLOSE_TAG)], True),                        # closing tag missing
])
def test_is_cut_says_whether_the_text_ended_inside_a_call(text: str, is_cut: bool) -> None:
    _, parser = stream(text, [3, 17])
    assert parser.is_cut is is_cut
