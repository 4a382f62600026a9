"""Incremental JSON pointer tracking: where each leaf of a streamed JSON value sits."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.guard.facts import escape_token
from grammars.json_lexer import COLON, COMMA, OPEN, SCALAR, STRING_OPEN, WS, JsonLexer

_SCALAR_START = set('-0123456789tfn')


@dataclass(slots=True)
class _Frame:
    is_object: bool
    pointer: str
    key: str | None = None   # object: the key whose value comes next
    index: int = 0           # array: the index of the next element
    expect: str = "value"    # object: key | colon | value | comma; array: value | comma


class JsonPointerParser:
    """Fed text chunks, yields (pointer, value, start, end) for each completed JSON leaf.

    Offsets are absolute in the fed text. Text before the first `{`/`[` is skipped; on a syntax
    error the parser drops the value and looks for the next `{`/`[` (prose around JSON). The
    characters are read by the shared JSON lexer; this class adds the grammar (keys, values,
    separators) and the pointers.
    """

    def __init__(self) -> None:
        self.pos = 0
        self.stack: list[_Frame] = []
        self.lexer = JsonLexer(tracks_scalars=True)
        self.token_start = -1     # start of the string or scalar being read, -1 when none
        self.token = ""           # raw text of that string or scalar
        self.string_is_key = False

    @property
    def in_string(self) -> bool:
        return self.lexer.in_string

    def feed(self, chunk: str) -> list[tuple[str, Any, int, int]]:
        out: list[tuple[str, Any, int, int]] = []
        i, n = 0, len(chunk)
        lexer = self.lexer
        while i < n:
            if not self.stack:   # fast skip to the next container start
                j = _find_open(chunk, i)
                if j < 0:
                    self.pos += n - i
                    break
                self.pos += j - i
                i = j
            if lexer.in_string:
                j = lexer.string_run(chunk, i)   # the run of plain characters at once
                self.token += chunk[i:j]
                self.pos += j - i
                i = j
                if i < n:   # closing quote
                    lexer.step('"')
                    self.token += '"'
                    self.pos += 1
                    i += 1
                    self._string_done(out)
                continue
            self._char(chunk[i], out)
            self.pos += 1
            i += 1
        return out

    def _string_done(self, out: list[tuple[str, Any, int, int]]) -> None:
        try:
            value = json.loads(self.token)
        except ValueError:
            return self._reset()
        frame = self.stack[-1]
        if self.string_is_key:
            frame.key, frame.expect = value, "colon"
        else:
            out.append((self._child(frame), value, self.token_start, self.pos))
            self._advance(frame)
        self.token, self.token_start = "", -1

    def _scalar_done(self, out: list[tuple[str, Any, int, int]]) -> bool:
        try:
            value = json.loads(self.token)
        except ValueError:
            self._reset()
            return False
        frame = self.stack[-1]
        out.append((self._child(frame), value, self.token_start, self.pos))
        self._advance(frame)
        self.token, self.token_start = "", -1
        return True

    def _char(self, ch: str, out: list[tuple[str, Any, int, int]]) -> None:
        was_scalar = self.lexer.in_scalar
        lexeme = self.lexer.step(ch)
        if was_scalar:                  # inside a number or literal
            if lexeme is SCALAR:
                self.token += ch
                return
            if not self._scalar_done(out):
                return
        if not self.stack:
            self.stack.append(_Frame(ch == "{", "", expect="key" if ch == "{" else "value"))
            return
        frame = self.stack[-1]
        if lexeme is WS:
            return
        if frame.expect == "value":
            if lexeme is OPEN:
                self.stack.append(_Frame(ch == "{", self._child(frame),
                                         expect="key" if ch == "{" else "value"))
            elif lexeme is STRING_OPEN:
                self._start_string(False)
            elif lexeme is SCALAR and ch in _SCALAR_START:
                self.token_start, self.token = self.pos, ch
            elif ch == "]" and not frame.is_object and frame.index == 0:
                self._close()
            else:
                self._reset()
        elif frame.expect == "key":
            if lexeme is STRING_OPEN:
                self._start_string(True)
            elif ch == "}" and frame.key is None:
                self._close()
            else:
                self._reset()
        elif frame.expect == "colon":
            if lexeme is COLON:
                frame.expect = "value"
            else:
                self._reset()
        else:   # comma
            if lexeme is COMMA:
                frame.expect = "key" if frame.is_object else "value"
            elif ch == ("}" if frame.is_object else "]"):
                self._close()
            else:
                self._reset()

    def _start_string(self, is_key: bool) -> None:
        self.string_is_key = is_key
        self.token_start, self.token = self.pos, '"'

    def _child(self, frame: _Frame) -> str:
        if frame.is_object:
            return f"{frame.pointer}/{escape_token(str(frame.key))}"
        return f"{frame.pointer}/{frame.index}"

    def _advance(self, frame: _Frame) -> None:
        if frame.is_object:
            frame.expect = "comma"
        else:
            frame.index += 1
            frame.expect = "comma"

    def _close(self) -> None:
        self.stack.pop()
        if self.stack:
            self._advance(self.stack[-1])

    def _reset(self) -> None:
        self.stack.clear()
        self.lexer.reset()
        self.token, self.token_start = "", -1


def _find_open(text: str, start: int) -> int:
    a, b = text.find("{", start), text.find("[", start)
    if a < 0:
        return b
    return a if b < 0 else min(a, b)


def leaf_spans(text: str) -> dict[str, tuple[int, int]]:
    """JSON pointer -> [start, end) of that leaf in a whole document's text."""
    return {ptr: (s, e) for ptr, _, s, e in JsonPointerParser().feed(text)}


def pointer_of(path: Any) -> str:
    """The JSON pointer of a path of keys and indices (jsonschema's absolute_path)."""
    return "".join("/" + escape_token(str(p)) for p in path)
