"""The shared incremental JSON lexer: what each character is, strings and escapes, depth,
scalars when tracked, and the bulk string run agreeing with character steps."""
from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from grammars.json_lexer import (CLOSE, COLON, COMMA, OPEN, SCALAR, STRING, STRING_CLOSE,
                                 STRING_OPEN, WS, JsonLexer, Lexeme)


def lex(text: str, lexer: JsonLexer | None = None) -> list[Lexeme]:
    lexer = lexer if lexer is not None else JsonLexer()
    return [lexer.step(ch) for ch in text]


def test_each_character_of_a_document() -> None:
    assert lex('{"a": [1, "x"]}') == [
        OPEN, STRING_OPEN, STRING, STRING_CLOSE, COLON, WS, OPEN, SCALAR,
        COMMA, WS, STRING_OPEN, STRING, STRING_CLOSE, CLOSE, CLOSE]


def test_escapes_keep_a_string_open() -> None:
    assert lex(r'"a\"b"')[-1] is STRING_CLOSE and lex(r'"a\"b"')[3] is STRING
    lexer = JsonLexer()
    lex(r'"\\"', lexer)                      # an escaped backslash, then the closing quote
    assert not lexer.in_string
    lexer = JsonLexer()
    lex(r'"\\\"', lexer)                     # ... then an escaped quote: still open
    assert lexer.in_string and not lexer.escaped
    assert lex('"{[}]:,"')[1:-1] == [STRING] * 6   # structure inside a string is text


def test_depth_counts_brackets_and_never_drops_below_zero() -> None:
    lexer = JsonLexer()
    lex("}]{[", lexer)
    assert lexer.depth == 2
    lex('"]"]', lexer)
    assert lexer.depth == 1
    lexer.reset()
    assert (lexer.depth, lexer.in_string, lexer.escaped, lexer.in_scalar) == (0, False, False, False)


def test_scalars_run_to_a_delimiter_only_when_tracked() -> None:
    # Tracked: everything up to whitespace or one of ,]} belongs to the scalar.
    tracked = JsonLexer(tracks_scalars=True)
    assert lex('1"x{ ', tracked) == [SCALAR, SCALAR, SCALAR, SCALAR, WS]
    assert not tracked.in_string and tracked.depth == 0
    assert lex("true]", JsonLexer(tracks_scalars=True, depth=1))[-1] is CLOSE
    # Untracked (closing reads free text): a quote after a word opens a string.
    plain = JsonLexer()
    assert lex('say "hi', plain)[4] is STRING_OPEN and plain.in_string


_TEXT = st.text(alphabet='ab"\\{}[]:, \n', max_size=40)


@settings(max_examples=300, deadline=None)
@given(_TEXT, _TEXT)
def test_string_run_agrees_with_steps(before: str, text: str) -> None:
    run, steps = JsonLexer(), JsonLexer()
    lex(before + '"', run)
    lex(before + '"', steps)
    if not run.in_string:
        return
    end = run.string_run(text, 0)
    for k, ch in enumerate(text):
        if steps.step(ch) is STRING_CLOSE:
            assert end == k
            break
    else:
        assert end == len(text)
    assert (run.in_string, run.escaped) == (True, steps.escaped if end == len(text) else False)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12)


def _strings(value: Any) -> list[str]:
    """Every key and string in document order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    return []


@settings(max_examples=300, deadline=None)
@given(_JSON, st.sampled_from([None, 1]), st.booleans())
def test_documents_lex_into_their_strings_and_brackets(value: Any, indent: int | None,
                                                       tracks_scalars: bool) -> None:
    text = json.dumps(value, indent=indent)
    lexer = JsonLexer(tracks_scalars=tracks_scalars)
    strings, start, max_depth = [], -1, 0
    for i, ch in enumerate(text):
        lexeme = lexer.step(ch)
        max_depth = max(max_depth, lexer.depth)
        if lexeme is STRING_OPEN:
            start = i
        elif lexeme is STRING_CLOSE:
            strings.append(json.loads(text[start:i + 1]))
    assert strings == _strings(value)
    assert lexer.depth == 0 and not lexer.in_string
    assert max_depth == _depth(value)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0
