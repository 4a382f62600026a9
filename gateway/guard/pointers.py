"""Incremental JSON pointer tracking: where each leaf of a streamed JSON value sits."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.guard.facts import escape_token

_WS = " \t\r\n"
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
    error the parser drops the value and looks for the next `{`/`[` (prose around JSON).
    """

    def __init__(self) -> None:
        self.pos = 0
        self.stack: list[_Frame] = []
        self.token_start = -1     # start of the scalar being read, -1 when none
        self.token = ""           # raw text of that scalar
        self.in_string = False
        self.escape = False
        self.string_is_key = False

    def feed(self, chunk: str) -> list[tuple[str, Any, int, int]]:
        out: list[tuple[str, Any, int, int]] = []
        i, n = 0, len(chunk)
        while i < n:
            if not self.stack:   # fast skip to the next container start
                j = _find_open(chunk, i)
                if j < 0:
                    self.pos += n - i
                    break
                self.pos += j - i
                i = j
            ch = chunk[i]
            if self.in_string:
                # Take the run of plain characters at once.
                j = i
                while j < n:
                    c = chunk[j]
                    if self.escape:
                        self.escape = False
                    elif c == "\\":
                        self.escape = True
                    elif c == '"':
                        break
                    j += 1
                self.token += chunk[i:j]
                self.pos += j - i
                i = j
                if i < n:   # closing quote
                    self.token += '"'
                    self.pos += 1
                    i += 1
                    self.in_string = False
                    self._string_done(out)
                continue
            self._char(ch, out)
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
        if self.token_start >= 0:       # inside a number or literal
            if ch in _WS or ch in ",]}":
                if not self._scalar_done(out):
                    return
            else:
                self.token += ch
                return
        if not self.stack:
            self.stack.append(_Frame(ch == "{", "", expect="key" if ch == "{" else "value"))
            return
        frame = self.stack[-1]
        if ch in _WS:
            return
        if frame.expect == "value":
            if ch == "{" or ch == "[":
                self.stack.append(_Frame(ch == "{", self._child(frame),
                                         expect="key" if ch == "{" else "value"))
            elif ch == '"':
                self._start_string(False)
            elif ch in _SCALAR_START:
                self.token_start, self.token = self.pos, ch
            elif ch == "]" and not frame.is_object and frame.index == 0:
                self._close()
            else:
                self._reset()
        elif frame.expect == "key":
            if ch == '"':
                self._start_string(True)
            elif ch == "}" and frame.key is None:
                self._close()
            else:
                self._reset()
        elif frame.expect == "colon":
            if ch == ":":
                frame.expect = "value"
            else:
                self._reset()
        else:   # comma
            if ch == ",":
                frame.expect = "key" if frame.is_object else "value"
            elif ch == ("}" if frame.is_object else "]"):
                self._close()
            else:
                self._reset()

    def _start_string(self, is_key: bool) -> None:
        self.in_string, self.escape, self.string_is_key = True, False, is_key
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
        self.token, self.token_start, self.in_string = "", -1, False


def _find_open(text: str, start: int) -> int:
    a, b = text.find("{", start), text.find("[", start)
    if a < 0:
        return b
    return a if b < 0 else min(a, b)
