"""One incremental JSON lexer for every reader of generated JSON text.

Budget-aware closing (`closing.JsonScan`), the guard's release units, the tool-call parser
(`gateway/tool_calls.py`) and the guard's JSON-pointer tracker all read text that arrives a
piece at a time and may not be JSON at all. Each needs the same few facts about the character in
hand: is it inside a string (escapes included), does it open or close a bracket, is it a
separator. This lexer keeps that state and classifies each character; it never fails. What a
character that breaks the syntax means is the reader's business (the pointer tracker starts
over, closing carries on), so the lexer only reports and never judges.

Numbers and literals (`true`, `false`, `null`) are tracked only when asked (`tracks_scalars`):
such a scalar runs until whitespace or one of `,]}`, and every character before that belongs to
it. Without it, a character outside strings that is neither structure nor whitespace is
reported as `SCALAR` and leaves the state alone, so a quote after free text still opens a string.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

WHITESPACE = " \t\r\n"
_ENDS_SCALAR = WHITESPACE + ",]}"


class Lexeme(Enum):
    """What one character is, given the text before it."""

    WS = auto()
    OPEN = auto()           # `{` or `[` outside a string
    CLOSE = auto()          # `}` or `]` outside a string (depth never drops below 0)
    COLON = auto()
    COMMA = auto()
    STRING_OPEN = auto()    # the opening quote
    STRING = auto()         # a character inside a string, escapes included
    STRING_CLOSE = auto()   # the closing quote
    SCALAR = auto()         # a character of a number or literal, or anything else


# The members as module constants: `Lexeme.X` is a class-attribute lookup (about 0.1 us on
# Python 3.11), paid per character by every reader.
WS, OPEN, CLOSE, COLON, COMMA = Lexeme.WS, Lexeme.OPEN, Lexeme.CLOSE, Lexeme.COLON, Lexeme.COMMA
STRING_OPEN, STRING, STRING_CLOSE = Lexeme.STRING_OPEN, Lexeme.STRING, Lexeme.STRING_CLOSE
SCALAR = Lexeme.SCALAR
_STRUCTURE = {"{": OPEN, "[": OPEN, "}": CLOSE, "]": CLOSE, ":": COLON, ",": COMMA,
              '"': STRING_OPEN, **{ch: WS for ch in WHITESPACE}}


@dataclass(slots=True)
class JsonLexer:
    """Lexer state after the characters fed so far (text is only ever appended)."""

    tracks_scalars: bool = False
    in_string: bool = False
    escaped: bool = False       # inside a string, after an unescaped backslash
    in_scalar: bool = False     # only with tracks_scalars
    depth: int = 0              # open brackets outside strings

    def step(self, ch: str) -> Lexeme:
        """Advance one character; what it is."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
                return STRING_CLOSE
            return STRING
        if self.in_scalar:
            if ch not in _ENDS_SCALAR:
                return SCALAR
            self.in_scalar = False      # the delimiter is read below as what it is
        lexeme = _STRUCTURE.get(ch)
        if lexeme is None:
            self.in_scalar = self.tracks_scalars
            return SCALAR
        if lexeme is OPEN:
            self.depth += 1
        elif lexeme is CLOSE:
            if self.depth:
                self.depth -= 1
        elif lexeme is STRING_OPEN:
            self.in_string = True
        return lexeme

    def string_run(self, text: str, start: int) -> int:
        """Inside a string: consume `text[start:]` up to its closing quote, which is left for
        `step`; the index of that quote, or len(text). The same as stepping each character,
        without a call per character (string bodies are most of the text)."""
        assert self.in_string
        j, n = start, len(text)
        escaped = self.escaped
        while j < n:
            c = text[j]
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                break
            j += 1
        self.escaped = escaped
        return j

    def reset(self) -> None:
        """Forget everything: the next character starts new text."""
        self.in_string = self.escaped = self.in_scalar = False
        self.depth = 0
