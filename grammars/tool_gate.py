"""The jsonschema gate of tool calls whose parameter schema the grammar relaxed, and of a
response-format document beside tools: inside a Lark grammar, what fallback.ValidatedGrammar's
EOS gate is for a whole document.

A relaxed `%json` accepts a superset of what the schema allows, so the grammar alone could let a
call close on arguments that fail. This cursor wraps the grammar's own and follows the text
with the JSON lexer. Where the output stands inside a gated value, every allowed token that
holds a closing bracket is tried on a copy of that state, and its bit is cleared where it would
close the value (a call's arguments, or the call around them; the document) on text that
jsonschema refuses. accept_token refuses such a token likewise, so fast-forward cannot slip one
in. The lexer runs over bytes (as latin-1 characters): JSON's structure is ASCII, and a character
split across tokens is decoded whole when a value is validated.

Soundness as in fallback.py: a gated value only closes valid. The price is the same too: a dead
end (the relaxed grammar allows nothing but a closing token the gate refuses) leaves the row all
zero and is_dead() True; the engine then ends the choice "length", which the response marks
incomplete. Cost: only inside a gated value, one lexer pass over each allowed token that holds
`}` or `]` per step (a few thousand characters at most).
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import TYPE_CHECKING, Any, Callable, Sequence

from grammars.fallback import no_duplicate_keys, rollback_inner, schema_validator
from grammars.json_lexer import CLOSE, JsonLexer
from grammars.spec import GrammarSpec
from grammars.tools import OPEN_TAG

if TYPE_CHECKING:
    import torch

    from grammars.base import CompiledGrammar, Grammar

_CALL_PREFIX = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')
_CALL_NAME = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*")')


def closer_tokens(decode_bytes: Callable[[list[int]], bytes], vocab_size: int) -> list[tuple[int, str]]:
    """(token id, its bytes as latin-1 text) for every token holding `}` or `]`."""
    out = []
    for token_id in range(vocab_size):
        data = decode_bytes([token_id])
        if b"}" in data or b"]" in data:
            out.append((token_id, data.decode("latin-1")))
    return out


def _ids_array(closers: list[tuple[int, str]]) -> Any:
    import numpy as np

    return np.array([t for t, _ in closers], dtype=np.int64)


class _Validators:
    """The original schemas of a spec's gates, and the verdicts given so far."""

    def __init__(self, gates: dict[str, Any]) -> None:
        self.tools = {name: schema_validator(s) for name, s in gates.get("tools", {}).items()}
        self.document = schema_validator(gates["document"]) if "document" in gates else None
        self._verdicts: dict[tuple[str | None, str], bool] = {}

    def is_valid(self, name: str | None, text: str) -> bool:
        key = (name, text)
        verdict = self._verdicts.get(key)
        if verdict is None:
            validator = self.document if name is None else self.tools[name]
            try:
                doc = json.loads(text.encode("latin-1").decode("utf-8"), object_pairs_hook=no_duplicate_keys)
                verdict = bool(validator.is_valid(doc))
            except Exception:   # not JSON, bad UTF-8: fail closed
                verdict = False
            self._verdicts[key] = verdict
        return verdict


@dataclasses.dataclass(slots=True)
class _Position:
    """Where the output stands: in a call (since its tag) or outside, and the lexer there."""

    in_call: bool = False
    gated: str | None = None     # in a call: its tool where gated, "" where not, None before
                                 # its name is read (until then every closing is checked)
    text: str = ""               # the call since its tag, or the document so far (latin-1)
    tail: str = ""               # outside calls: the last characters, to spot a tag
    lexer: JsonLexer = dataclasses.field(default_factory=JsonLexer)
    saw_call: bool = False       # a call began: the output is calls, not a document

    def copy(self) -> _Position:
        return _Position(self.in_call, self.gated, self.text, self.tail, dataclasses.replace(self.lexer),
                         self.saw_call)

    def feed(self, text: str, gate: _Validators) -> bool:
        """Advance over text; False at a character that closes a gated value that fails."""
        for ch in text:
            if not self.in_call:
                self.tail = (self.tail + ch)[-len(OPEN_TAG):]
                if self.tail == OPEN_TAG:
                    self.in_call, self.gated, self.text, self.tail = True, None, "", ""
                    self.saw_call = True
                    self.lexer.reset()
                    continue
                if gate.document is None or self.saw_call:
                    continue             # nothing outside calls is gated
            depth = self.lexer.depth
            lexeme = self.lexer.step(ch)
            self.text += ch
            if self.in_call and self.gated is None and (m := _CALL_NAME.match(self.text)):
                name = json.loads(m.group(1))
                self.gated = name if name in gate.tools else ""
            if lexeme is not CLOSE:
                continue
            if self.in_call:
                if not self._call_closes(depth, gate):
                    return False
            elif depth == 1 and not gate.is_valid(None, self.text.strip()):
                return False
        return True

    def _call_closes(self, depth: int, gate: _Validators) -> bool:
        if depth == 1:                           # the call's own object closed: the call ends
            ok = not self.gated or gate.is_valid(self.gated, self._arguments()[:-1])
            self.in_call, self.text = False, ""
            self.lexer.reset()
            return ok
        if depth == 2 and self.gated:            # its arguments closed (a name read by now)
            return gate.is_valid(self.gated, self._arguments())
        return True

    def _arguments(self) -> str:
        m = _CALL_PREFIX.match(self.text)
        return self.text[m.end():] if m else ""

    def is_gated(self, gate: _Validators) -> bool:
        """Whether the next token could close a gated value."""
        return self.gated != "" if self.in_call else gate.document is not None and not self.saw_call

    def document_fails(self, gate: _Validators) -> bool:
        """A gated document has begun and is not (yet) one its schema accepts: no EOS here.
        (Objects and arrays are judged as they close too; this covers a scalar document.)"""
        return (gate.document is not None and not self.saw_call and not self.in_call
                and bool(self.text.strip()) and not gate.is_valid(None, self.text.strip()))


class ToolGatedCompiled:
    """A compiled tool grammar whose cursors gate the calls (and document) it relaxed."""

    def __init__(self, inner: CompiledGrammar, decode_bytes: Callable[[list[int]], bytes],
                 closers: list[tuple[int, str]], eos_token_id: int) -> None:
        self.spec: GrammarSpec = inner.spec
        self.backend = inner.backend
        self.vocab_size = inner.vocab_size
        self.notes = (*inner.notes, "tool schemas relaxed; closing gated by jsonschema")
        self._inner = inner
        self._decode = decode_bytes
        self._closers = closers
        self._closer_ids = _ids_array(closers)
        self._gates = json.loads(inner.spec.gates)
        self._eos = eos_token_id

    def matcher(self) -> ToolGatedGrammar:
        return ToolGatedGrammar(self._inner.matcher(), _Validators(self._gates), self._decode,
                                self._closers, self._closer_ids, self.vocab_size, self._eos)


class ToolGatedGrammar:
    """A cursor over a tool grammar; gated values close only where jsonschema accepts them."""

    def __init__(self, inner: Grammar, validators: _Validators, decode_bytes: Callable[[list[int]], bytes],
                 closers: list[tuple[int, str]], closer_ids: Any, vocab_size: int, eos_token_id: int) -> None:
        self._inner = inner
        self._gate = validators
        self._decode = decode_bytes
        self._closers = closers
        self._closer_ids = closer_ids      # int64 [len(closers)]
        self._vocab_size = vocab_size
        self._eos = eos_token_id
        self._ended = False                # EOS accepted
        self._texts: list[str] = []        # accepted tokens' bytes as latin-1, EOS excluded
        self._position = _Position()
        self._gated_row: tuple[int, Any] | None = None   # (len(texts), gated row) from is_dead
        self._scratch: torch.Tensor | None = None         # one bitmask row for is_dead

    @property
    def ll_matcher(self) -> Any:
        """The inner llguidance matcher, for batched mask fills (then gate_row per row)."""
        return getattr(self._inner, "ll_matcher", None)

    def _text_of(self, token_id: int) -> str:
        return self._decode([token_id]).decode("latin-1")

    def accept_token(self, token_id: int) -> bool:
        if self._ended:
            return False
        if token_id == self._eos:       # gated calls closed valid before; a document is judged now
            if self._position.document_fails(self._gate):
                return False
            self._ended = self._inner.accept_token(token_id)
            return self._ended
        if not 0 <= token_id < self._vocab_size:
            return False
        text = self._text_of(token_id)
        if self._position.is_gated(self._gate) and not self._position.copy().feed(text, self._gate):
            return False
        if not self._inner.accept_token(token_id):
            return False
        self._texts.append(text)
        self._position.feed(text, self._gate)
        return True

    def accept(self, token_ids: Sequence[int]) -> bool:
        return all(self.accept_token(t) for t in token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._inner.fill_bitmask(bitmask, row)
        self.gate_row(bitmask, row)

    def gate_row(self, bitmask: torch.Tensor, row: int) -> None:
        """Clear the bits of tokens that would close a gated value on text that fails."""
        if not self._position.is_gated(self._gate):
            return
        if self._gated_row is not None and self._gated_row[0] == len(self._texts):
            bitmask[row] = self._gated_row[1]
            return
        import numpy as np

        words = bitmask[row].numpy().view(np.uint32)        # [ceil(vocab/32)], shares memory
        if self._position.document_fails(self._gate):
            words[self._eos >> 5] &= np.uint32(~(1 << (self._eos & 31)) & 0xFFFFFFFF)
        ids = self._closer_ids
        allowed = np.flatnonzero((words[ids >> 5] >> (ids & 31).astype(np.uint32)) & 1)
        for k in allowed.tolist():
            token_id, text = self._closers[k]
            if not self._position.copy().feed(text, self._gate):
                words[token_id >> 5] &= np.uint32(~(1 << (token_id & 31)) & 0xFFFFFFFF)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        num_tokens = rollback_inner(self, num_tokens)
        del self._texts[len(self._texts) - num_tokens:]
        self._position = _Position()
        for text in self._texts:
            self._position.feed(text, self._gate)
        self._gated_row = None

    def is_terminated(self) -> bool:
        return self._ended or (self._inner.is_terminated() and not self._position.document_fails(self._gate))

    def is_dead(self) -> bool:
        """True where nothing can follow: the relaxed grammar allows only closings that fail."""
        if self._inner.is_dead():
            return True
        if self._ended or not self._position.is_gated(self._gate):
            return False
        if self._inner.is_terminated():
            return self._position.document_fails(self._gate)
        if self._scratch is None:
            from grammars.base import allocate_bitmask
            self._scratch = allocate_bitmask(1, self._vocab_size)
        scratch = self._scratch
        self._gated_row = None
        self.fill_bitmask(scratch, 0)
        self._gated_row = (len(self._texts), scratch[0].clone())
        return not bool(scratch[0].any())

    def forced_tokens(self) -> list[int]:
        return self._inner.forced_tokens()

    def reset(self) -> None:
        self._inner.reset()
        self._ended = False
        self._texts.clear()
        self._position = _Position()
        self._gated_row = None


def gate_tool_calls(inner: CompiledGrammar, decode_bytes: Callable[[list[int]], bytes],
                    closers: Callable[[], list[tuple[int, str]]], eos_token_id: int) -> CompiledGrammar:
    """`inner` itself, or wrapped in the gate when its spec has gates (closers: built on demand)."""
    return ToolGatedCompiled(inner, decode_bytes, closers(), eos_token_id) if inner.spec.gates else inner

