"""llguidance adapter (the default backend): JSON schema, regex, choice and Lark grammars.

Compiles are near-instant (an Earley parser over a lazily built lexer, no vocabulary-wide
precomputation), masks take well under a millisecond, and it reports forced (fast-forward)
tokens. Special tokens of the tokenizer are only ever matched by explicit `<|name|>` syntax in a
grammar, so they never appear inside JSON strings; byte-level tokens (partial UTF-8) are handled
on bytes, so a character split across tokens is still reachable.

json_schema specs that llguidance refuses go through grammars/fallback.py: a relaxed superset is
compiled here, and the document is validated with jsonschema before EOS is allowed.
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from typing import TYPE_CHECKING, Any, Sequence, cast

import llguidance
import llguidance.hf

from grammars.base import CompiledGrammar, CompilerOptions, check_bitmask_row
from grammars.fallback import compile_json_schema
from grammars.spec import GrammarError, GrammarSpec
from grammars.tool_gate import closer_tokens, gate_tool_calls

if TYPE_CHECKING:
    import torch
    from llguidance._lib import JsonCompileOptions

# Building an LLTokenizer walks the whole vocabulary (~0.5 s); one per HF tokenizer object.
_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[int, llguidance.LLTokenizer]] = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def ll_tokenizer(tokenizer: Any, vocab_size: int) -> llguidance.LLTokenizer:
    """The llguidance view of a Hugging Face fast tokenizer, padded to the model's vocab_size."""
    with _TOKENIZERS_LOCK:
        per_size = _TOKENIZERS.setdefault(tokenizer, {})
        llt = per_size.get(vocab_size)
        if llt is None:
            # transformers 5 names its fast tokenizer class TokenizersBackend and keeps
            # PreTrainedTokenizerFast as an alias, so llguidance's helper accepts it; it
            # serialises the Rust tokenizer, added tokens included, so bytes stay exact.
            try:
                llt = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
            except ValueError as e:
                raise GrammarError(f"llguidance needs a fast (Rust) tokenizer: {e}") from None
            per_size[vocab_size] = llt
        return llt


_EXECUTOR: llguidance.LLExecutor | None = None


def fill_rows_parallel(bitmask: torch.Tensor, batch: Sequence[tuple[Any, llguidance.LLMatcher, int]]) -> None:
    """Fill the rows of many llguidance cursors at once: (grammar, its ll_matcher, row)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    width = bitmask.shape[1]
    for _, _, row in batch:
        check_bitmask_row(bitmask, row, width * 32)
    assert bitmask.is_contiguous(), "the batched fill writes whole rows through one pointer"
    _EXECUTOR.unsafe_compute_mask_ptr([(m, row) for _, m, row in batch], bitmask.data_ptr(), width * 4,
                                      bitmask.shape[0])
    for grammar, _, row in batch:
        gate = getattr(grammar, "gate_row", None)    # a wrapper's own say on its row
        if gate is not None:
            gate(bitmask, row)


def _lark_literal(text: str) -> str:
    # llguidance Lark string literals take JSON string escapes.
    return json.dumps(text, ensure_ascii=False)


class LLGuidanceGrammar:
    """A request's cursor: an llguidance LLMatcher."""

    __slots__ = ("_matcher", "_width", "_eos", "_ended", "_eos_counted")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_token_id: int) -> None:
        self._matcher = matcher
        self._width = (vocab_size + 31) // 32
        self._eos = eos_token_id
        self._ended = False        # EOS accepted
        self._eos_counted = False  # whether llguidance counts that EOS as a token for rollback

    @property
    def ll_matcher(self) -> llguidance.LLMatcher:
        return self._matcher

    def accept_token(self, token_id: int) -> bool:
        if self._ended:
            return False
        if token_id == self._eos:
            # try_consume_tokens never takes EOS; consume_token does, where the grammar accepts.
            # A matcher that already stopped (nothing can follow) takes EOS without recording it.
            if not self.is_accepting():
                return False
            was_stopped = self._matcher.is_stopped()
            if not self._matcher.consume_token(token_id):
                return False
            self._ended, self._eos_counted = True, not was_stopped
            return True
        # try_consume_tokens leaves the matcher untouched on a forbidden token, where
        # consume_token would put it into a permanent error state.
        return self._matcher.try_consume_tokens([token_id]) == 1

    def accept(self, token_ids: Sequence[int]) -> bool:
        token_ids = list(token_ids)
        if self._eos in token_ids:
            return all(self.accept_token(t) for t in token_ids)
        return self._matcher.try_consume_tokens(token_ids) == len(token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        check_bitmask_row(bitmask, row, self._width * 32)
        self._matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), self._width * 4)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0 and self._ended:
            self._ended = False
            if not self._eos_counted:
                num_tokens -= 1
        if num_tokens > 0:
            ok = self._matcher.rollback(num_tokens)
            assert ok, f"llguidance rollback({num_tokens}) failed: {self._matcher.get_error()}"

    def is_terminated(self) -> bool:
        return self._ended or (self._matcher.is_stopped() and not self._matcher.is_error())

    def is_accepting(self) -> bool:
        """True where EOS may come next."""
        return self._matcher.is_accepting() and not self._matcher.is_error()

    def is_dead(self) -> bool:
        return self._matcher.is_error()

    def forced_tokens(self) -> list[int]:
        if self._ended or self._matcher.is_stopped():
            return []
        return list(self._matcher.compute_ff_tokens())

    def reset(self) -> None:
        self._matcher.reset()
        self._ended = False

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class LLGuidanceCompiled:
    """An immutable compiled grammar: a template matcher that each request deep-copies."""

    def __init__(self, spec: GrammarSpec, template: llguidance.LLMatcher, vocab_size: int, eos_token_id: int) -> None:
        self.spec = spec
        self.backend = "llguidance"
        self.vocab_size = vocab_size
        self.notes: tuple[str, ...] = ()
        self._template = template
        self._eos = eos_token_id

    def matcher(self) -> LLGuidanceGrammar:
        return LLGuidanceGrammar(self._template.deep_copy(), self.vocab_size, self._eos)


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, options: CompilerOptions) -> None:
        self.options = options
        self.vocab_size = vocab_size
        self.llt = ll_tokenizer(tokenizer, vocab_size)
        self._lock = threading.Lock()
        self._closer_tokens: list[tuple[int, str]] | None = None
        if options.max_whitespace == 0:
            self._json_options: dict[str, Any] = {"whitespace_flexible": False}
        else:
            self._json_options = {"whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{1,{options.max_whitespace}}}"}

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        if spec.kind == "json_schema":
            return compile_json_schema(spec, self.options, self.name, self._compile_schema,
                                       self.llt.decode_bytes, self.llt.eos_token)
        if spec.kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, overrides=cast("JsonCompileOptions", self._json_options))
        elif spec.kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec.source)
        elif spec.kind == "choice":
            grammar = llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(_lark_literal(c) for c in spec.choices()))
        elif spec.kind == "cfg":
            grammar = llguidance.LLMatcher.grammar_from_lark(spec.source)
        else:
            raise GrammarError(f"llguidance cannot compile grammar kind {spec.kind!r}")
        compiled = LLGuidanceCompiled(spec, self._build(grammar, spec.kind), self.vocab_size, self.llt.eos_token)
        return gate_tool_calls(compiled, self.llt.decode_bytes, self._closers, self.llt.eos_token)

    def _closers(self) -> list[tuple[int, str]]:
        # Once per backend (a pass over the vocabulary), for tool grammars with gates.
        with self._lock:
            if self._closer_tokens is None:
                self._closer_tokens = closer_tokens(self.llt.decode_bytes, self.vocab_size)
            return self._closer_tokens

    def _compile_schema(self, spec: GrammarSpec, schema: Any, extra: dict[str, Any]) -> LLGuidanceCompiled:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, overrides=cast("JsonCompileOptions", {**self._json_options, **extra}))
        except ValueError as e:
            raise GrammarError(_clean(str(e))) from None
        return LLGuidanceCompiled(spec, self._build(grammar, "json_schema"), self.vocab_size, self.llt.eos_token)

    def _build(self, grammar: str, kind: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.llt, grammar, log_level=0)
        if matcher.is_error():
            error = _clean(matcher.get_error())
            raise GrammarError(error if kind == "json_schema" else f"invalid {kind} grammar: {error}")
        return matcher


def _clean(message: str) -> str:
    # llguidance errors carry parser state dumps after the first lines; keep the message.
    return re.sub(r"\s+", " ", message.strip().split("\n<state>")[0])[:500]
