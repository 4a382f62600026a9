"""outlines-core adapter: regex, choice and JSON schema (through its schema-to-regex).

outlines-core compiles a regex into a token-level DFA over the whole vocabulary up front, so
masks are a table lookup but compiles of real schemas are slow and large (measured on this
machine: a realistic tool-call schema did not finish in 300 s and used 4 GB). Keep it for
regex/choice constraints or small schemas, behind the compile timeout. No Lark grammars (it has
no CFG support). JSON schemas go through grammars/fallback.py like llguidance's (relaxed with
a jsonschema EOS gate where refused, audited at EOS otherwise).

The vocabulary is built from each token's exact bytes (taken from llguidance's view of the same
tokenizer), so byte-level partial-UTF-8 tokens keep their bytes; special tokens are left out of
the vocabulary, so they are never allowed, and EOS is handled by outlines-core itself.
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from typing import TYPE_CHECKING, Any, Sequence

import outlines_core  # type: ignore[import-untyped, unused-ignore]

from grammars.base import CompiledGrammar, CompilerOptions, check_bitmask_row
from grammars.fallback import compile_json_schema
from grammars.llguidance import ll_tokenizer
from grammars.spec import GrammarError, GrammarSpec

if TYPE_CHECKING:
    import torch

_VOCABS: weakref.WeakKeyDictionary[Any, dict[int, outlines_core.Vocabulary]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
# Rollback depth each cursor keeps (outlines-core stores past states up to this many).
MAX_ROLLBACK = 1024


def _vocabulary(tokenizer: Any, vocab_size: int) -> outlines_core.Vocabulary:
    with _LOCK:
        per_size = _VOCABS.setdefault(tokenizer, {})
        if vocab_size not in per_size:
            llt = ll_tokenizer(tokenizer, vocab_size)
            by_bytes: dict[bytes, list[int]] = {}
            for token_id in range(len(tokenizer)):
                if token_id == llt.eos_token or llt.is_special_token(token_id):
                    continue
                data = llt.decode_bytes([token_id])
                if data:
                    by_bytes.setdefault(data, []).append(token_id)
            per_size[vocab_size] = outlines_core.Vocabulary(llt.eos_token, by_bytes)
        return per_size[vocab_size]


class OutlinesCoreGrammar:
    """A request's cursor: an outlines-core Guide."""

    __slots__ = ("_guide", "_width", "_eos", "_ended")

    def __init__(self, guide: outlines_core.Guide, vocab_size: int, eos_token_id: int) -> None:
        self._guide = guide
        self._width = (vocab_size + 31) // 32
        self._eos = eos_token_id
        self._ended = False

    def accept_token(self, token_id: int) -> bool:
        if self._ended:
            return False
        if token_id == self._eos:
            # EOS ends the sequence in a final state; the guide itself has no transition for it.
            self._ended = bool(self._guide.is_finished())
            return self._ended
        try:
            self._guide.advance(token_id, return_tokens=False)
        except ValueError:  # no transition: the guide stays where it was
            return False
        return True

    def accept(self, token_ids: Sequence[int]) -> bool:
        return all(self.accept_token(t) for t in token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        check_bitmask_row(bitmask, row, self._width * 32)
        if self._ended:
            bitmask[row].zero_()
            return
        self._guide.write_mask_into(bitmask[row].data_ptr(), self._width, 4)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0 and self._ended:
            self._ended = False
            num_tokens -= 1
        if num_tokens > 0:
            self._guide.rollback_state(num_tokens)

    def is_terminated(self) -> bool:
        if self._ended:
            return True
        return bool(self._guide.is_finished()) and self._guide.get_tokens() == [self._eos]

    def is_dead(self) -> bool:
        return False

    def forced_tokens(self) -> list[int]:
        # Listing the allowed tokens to find a forced one costs a Python list per step; skip.
        return []

    def reset(self) -> None:
        self._guide.reset()
        self._ended = False


class OutlinesCoreCompiled:
    def __init__(self, spec: GrammarSpec, index: outlines_core.Index, vocab_size: int, eos_token_id: int) -> None:
        self.spec = spec
        self.backend = "outlines_core"
        self.vocab_size = vocab_size
        self.notes: tuple[str, ...] = ()
        self._index = index
        self._eos = eos_token_id

    def matcher(self) -> OutlinesCoreGrammar:
        guide = outlines_core.Guide(self._index, max_rollback=MAX_ROLLBACK)
        return OutlinesCoreGrammar(guide, self.vocab_size, self._eos)


class OutlinesCoreBackend:
    name = "outlines_core"

    def __init__(self, tokenizer: Any, vocab_size: int, options: CompilerOptions) -> None:
        self.options = options
        self.vocab_size = vocab_size
        self.vocabulary = _vocabulary(tokenizer, vocab_size)
        self._llt = ll_tokenizer(tokenizer, vocab_size)  # exact token bytes for the jsonschema gate
        self.eos_token_id = int(self.vocabulary.get_eos_token_id())
        # outlines-core's default JSON whitespace is already bounded (an optional single space).
        self._whitespace = "" if options.max_whitespace == 0 else None

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        if spec.kind == "json_schema":
            return compile_json_schema(spec, self.options, self.name, self._compile_schema,
                                       self._llt.decode_bytes, self._llt.eos_token)
        if spec.kind == "json_object":
            regex = self._schema_regex('{"type": "object"}')
        elif spec.kind == "regex":
            regex = spec.source
        elif spec.kind == "choice":
            regex = "|".join(re.escape(c) for c in spec.choices())
        else:
            raise GrammarError("outlines_core supports json_schema, json_object, regex and choice, "
                               f"not {spec.kind}")
        return self._compile_regex(spec, regex)

    def _compile_regex(self, spec: GrammarSpec, regex: str) -> OutlinesCoreCompiled:
        try:
            index = outlines_core.Index(regex, self.vocabulary)
        except Exception as e:
            raise GrammarError(f"outlines_core cannot compile this {spec.kind}: {str(e).strip()[:500]}") from None
        return OutlinesCoreCompiled(spec, index, self.vocab_size, self.eos_token_id)

    def _compile_schema(self, spec: GrammarSpec, schema: Any, extra: dict[str, Any]) -> OutlinesCoreCompiled:
        # `extra` holds llguidance's JSON options; outlines-core has no counterpart to use.
        return self._compile_regex(spec, self._schema_regex(json.dumps(schema)))

    def _schema_regex(self, schema_text: str) -> str:
        try:
            return str(outlines_core.json_schema.build_regex_from_schema(
                schema_text, whitespace_pattern=self._whitespace))
        except Exception as e:
            raise GrammarError(f"outlines_core cannot express this json_schema: {str(e).strip()[:500]}") from None
