"""Tool calls out of generated text, incrementally: content deltas and OpenAI tool-call deltas.

The text is fed as the stream releases it; `parse_tool_calls` runs the same parser over the
whole text at once, so streamed and non-streamed responses agree by construction. The format
is the one `grammars/tools.py` constrains the model to (one JSON object per call inside
`<tool_call>...</tool_call>`, name first); the parser also takes whitespace around the object
and either key order, as a template-native model might write it.

Content never carries call markup: a suffix that could begin `<tool_call>` is held back, and
so is trailing whitespace, which is dropped when a call follows. A call is announced (index,
id, type, name) once its name string closes; its argument text then streams raw, so the
fragments concatenate to exactly the generated JSON text. Text that opens a call but is not
one (only possible without the grammar, or cut by max_tokens before the name) is dropped;
a call cut after its name is kept and marked incomplete.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Callable, Union

from grammars.json_lexer import CLOSE, STRING_CLOSE, WHITESPACE, JsonLexer
from grammars.tools import CLOSE_TAG, OPEN_TAG

_ARGUMENT_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A call's first delta carries id and name (arguments ""); later ones argument text."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The entry of `choices[0].delta.tool_calls` for a chat.completion.chunk."""
        if self.id is not None:
            return {"index": self.index, "id": self.id, "type": "function",
                    "function": {"name": self.name, "arguments": self.arguments}}
        return {"index": self.index, "function": {"arguments": self.arguments}}


Delta = Union[ContentDelta, ToolCallDelta]


@dataclass(slots=True)
class ParsedToolCall:
    """A call as the parser read it from generated text (the request's earlier calls are
    `protocol.ToolCall`, the wire model)."""

    id: str
    name: str
    arguments: str = ""
    is_complete: bool = False  # the closing tag was seen

    def to_openai(self) -> dict[str, Any]:
        """The entry of `message.tool_calls` for a chat.completion."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class _State(Enum):
    TEXT = auto()         # free text, watching for the opening tag
    OBJECT_OPEN = auto()  # after the tag: whitespace, then "{"
    KEY = auto()          # whitespace, then a key string (or "}" if the object is empty)
    KEY_STRING = auto()
    COLON = auto()
    VALUE = auto()        # whitespace, then the value of the current key
    NAME_STRING = auto()
    ARGUMENTS = auto()    # inside the arguments value, streamed raw
    SKIP_VALUE = auto()   # inside the value of an unknown key
    AFTER_VALUE = auto()  # whitespace, then "," or "}"
    CLOSE = auto()        # whitespace, then the closing tag
    AFTER_CALL = auto()   # whitespace dropped; another call, or text


@dataclass(slots=True)
class _ValueEnd:
    """Where one JSON value ends, fed from its first character on."""

    lexer: JsonLexer = field(default_factory=JsonLexer)
    is_scalar: bool | None = None   # None before the first character

    def step(self, ch: str) -> tuple[bool, bool]:
        """Feed one character: (is it part of the value, does the value end with it)."""
        if self.is_scalar is None:
            self.is_scalar = ch not in '{["'
            if not self.is_scalar:
                self.lexer.step(ch)
            return True, False
        if self.is_scalar:  # numbers, true, false, null (or junk) end before a delimiter
            if ch in ",}]" or ch in WHITESPACE:
                return False, True
            return True, False
        lexeme = self.lexer.step(ch)
        ends = lexeme is STRING_CLOSE or lexeme is CLOSE
        return True, ends and self.lexer.depth == 0


@dataclass
class ToolCallParser:
    """Feed generated text chunk by chunk; get content and tool-call deltas back."""

    id_factory: Callable[[], str] = new_call_id
    tool_calls: list[ParsedToolCall] = field(default_factory=list, init=False)
    _content: list[str] = field(default_factory=list, init=False)
    _state: _State = field(default=_State.TEXT, init=False)
    _held: str = field(default="", init=False)       # text not yet judged (tag prefixes, blanks)
    _token: str = field(default="", init=False)      # the key or name string being read
    _key: str = field(default="", init=False)
    _name: str | None = field(default=None, init=False)
    _arguments: str = field(default="", init=False)  # of the current call, before it is announced
    _has_arguments: bool = field(default=False, init=False)
    _value: _ValueEnd = field(default_factory=_ValueEnd, init=False)
    _string: JsonLexer = field(default_factory=JsonLexer, init=False)   # the key or name string
    _out: list[Delta] = field(default_factory=list, init=False)
    _finished: bool = field(default=False, init=False)

    @property
    def content(self) -> str | None:
        """The text outside calls; None when there is none (OpenAI's content: null)."""
        text = "".join(self._content)
        return text or None

    @property
    def is_cut(self) -> bool:
        """Whether the text ended inside a call: its tag written, the call never closed (a stop
        string or max_tokens cut it; the response marks the choice incomplete)."""
        return (self._state not in (_State.TEXT, _State.AFTER_CALL)
                or any(not c.is_complete for c in self.tool_calls))

    def finish_reason(self, engine_reason: str) -> str:
        """OpenAI finish_reason: "tool_calls" when a response that stopped made calls."""
        return "tool_calls" if engine_reason == "stop" and self.tool_calls else engine_reason

    def feed(self, text: str) -> list[Delta]:
        """Consume the next piece of generated text; the deltas it releases."""
        assert not self._finished, "feed after finish"
        self._out = []
        self._held += text
        self._run()
        return self._out

    def finish(self) -> list[Delta]:
        """The end of the text: release what was held; the final deltas."""
        assert not self._finished, "finish called twice"
        self._out = []
        if self._state is _State.TEXT:
            self._emit_content(self._held)
        # Elsewhere the text was cut inside a call: a named one stays (incomplete), an
        # unnamed one is dropped (never content, see the module docstring).
        self._held = ""
        self._finished = True
        return self._out

    # --- the state machine ----------------------------------------------------------------

    def _run(self) -> None:
        while self._held:
            if self._state is _State.TEXT:
                if not self._step_text():
                    return
            elif self._state is _State.CLOSE:
                if not self._step_close():
                    return
            elif self._state is _State.AFTER_CALL:
                if not self._step_after_call():
                    return
            else:
                ch, self._held = self._held[0], self._held[1:]
                self._step_json(ch)

    def _step_text(self) -> bool:
        at = self._held.find(OPEN_TAG)
        if at >= 0:
            self._emit_content(self._held[:at].rstrip(WHITESPACE))
            self._held = self._held[at + len(OPEN_TAG):]
            self._open_call()
            return True
        keep = _partial_suffix(self._held, OPEN_TAG)
        body, tail = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        stripped = body.rstrip(WHITESPACE)
        self._emit_content(stripped)
        self._held = body[len(stripped):] + tail
        return False

    def _step_close(self) -> bool:
        stripped = self._held.lstrip(WHITESPACE)
        if len(stripped) < len(CLOSE_TAG):
            if CLOSE_TAG.startswith(stripped):
                self._held = stripped
                return False
        elif stripped.startswith(CLOSE_TAG):
            self.tool_calls[-1].is_complete = True
            self._held = stripped[len(CLOSE_TAG):]
            self._state = _State.AFTER_CALL
            return True
        # No closing tag where one belongs: the call ends here and the rest is text.
        self._held = stripped
        self._state = _State.TEXT
        return True

    def _step_after_call(self) -> bool:
        self._held = self._held.lstrip(WHITESPACE)
        if not self._held:
            return False
        self._state = _State.TEXT
        return True

    def _step_json(self, ch: str) -> None:
        s = self._state
        if s is _State.ARGUMENTS or s is _State.SKIP_VALUE:
            part_of, ends = self._value.step(ch)
            if part_of and s is _State.ARGUMENTS:
                self._add_arguments(ch)
            if ends:
                self._state = _State.AFTER_VALUE
                if not part_of:
                    self._held = ch + self._held
            return
        if s is _State.KEY_STRING or s is _State.NAME_STRING:
            self._token += ch
            if self._string.step(ch) is STRING_CLOSE:
                try:
                    value = json.loads(self._token)
                except json.JSONDecodeError:
                    self._malformed("")
                    return
                if s is _State.KEY_STRING:
                    self._key, self._state = value, _State.COLON
                else:
                    self._name, self._state = value, _State.AFTER_VALUE
                    self._announce()
            return
        if ch in WHITESPACE:
            return
        if s is _State.OBJECT_OPEN and ch == "{":
            self._state = _State.KEY
        elif s is _State.KEY and ch == '"':
            self._token, self._state = ch, _State.KEY_STRING
            self._string = JsonLexer(in_string=True)
        elif s is _State.COLON and ch == ":":
            self._state = _State.VALUE
        elif s is _State.VALUE and self._key == "name" and self._name is None:
            if ch == '"':
                self._token, self._state = ch, _State.NAME_STRING
                self._string = JsonLexer(in_string=True)
            else:
                self._malformed(ch)
        elif s is _State.VALUE:
            self._value = _ValueEnd()
            if self._key in _ARGUMENT_KEYS and not self._has_arguments:
                self._has_arguments, self._state = True, _State.ARGUMENTS
            else:
                self._state = _State.SKIP_VALUE
            self._held = ch + self._held
        elif s is _State.AFTER_VALUE and ch == ",":
            self._state = _State.KEY
        elif s in (_State.AFTER_VALUE, _State.KEY) and ch == "}":
            self._close_object()
        else:
            self._malformed(ch)

    def _open_call(self) -> None:
        self._state = _State.OBJECT_OPEN
        self._name, self._arguments, self._has_arguments, self._key = None, "", False, ""

    def _announce(self) -> None:
        assert self._name is not None
        index = len(self.tool_calls)
        call = ParsedToolCall(self.id_factory(), self._name)
        self.tool_calls.append(call)
        self._out.append(ToolCallDelta(index, "", call.id, call.name))
        if self._arguments:
            pending, self._arguments = self._arguments, ""
            self._add_arguments(pending)

    def _add_arguments(self, text: str) -> None:
        if self._name is None:  # arguments written before the name: held until it is known
            self._arguments += text
            return
        index = len(self.tool_calls) - 1
        self.tool_calls[index].arguments += text
        last = self._out[-1] if self._out else None
        if isinstance(last, ToolCallDelta) and last.index == index and last.id is None:
            self._out[-1] = ToolCallDelta(index, last.arguments + text)
        else:
            self._out.append(ToolCallDelta(index, text))

    def _close_object(self) -> None:
        if self._name is None:
            self._malformed("")
            return
        if not self._has_arguments:
            self._add_arguments("{}")
        self._state = _State.CLOSE

    def _malformed(self, ch: str) -> None:
        # Not a call after all. Before the name nothing was announced: the markup read so far
        # is dropped; after it, the call ends where it broke (incomplete). Either way text
        # resumes at the offending character.
        self._state = _State.TEXT
        self._held = ch + self._held

    def _emit_content(self, text: str) -> None:
        if not text:
            return
        self._content.append(text)
        if self._out and isinstance(self._out[-1], ContentDelta):
            self._out[-1] = ContentDelta(self._out[-1].text + text)
        else:
            self._out.append(ContentDelta(text))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_tool_calls(text: str, id_factory: Callable[[], str] = new_call_id
                     ) -> tuple[str | None, list[ParsedToolCall]]:
    """The whole generated text -> (content, tool_calls): the streaming parser run once."""
    parser = ToolCallParser(id_factory=id_factory)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.tool_calls


def deltas_to_openai(deltas: list[Delta]) -> list[dict[str, Any]]:
    """Deltas -> `choices[0].delta` objects, one per chunk, in order: runs of content become
    {"content": ...}; tool-call deltas {"tool_calls": [...]}, one call entry per chunk."""
    out: list[dict[str, Any]] = []
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            out.append({"content": delta.text})
        else:
            out.append({"tool_calls": [delta.to_openai()]})
    return out
