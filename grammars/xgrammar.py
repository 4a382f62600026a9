"""xgrammar adapter: JSON schema, regex, choice and Lark grammars through xgrammar.

Selectable per server or per request; llguidance stays the default (xgrammar precomputes
per-state token masks at compile time: seconds for a realistic schema on this CPU, where
llguidance takes milliseconds). JSON schemas go through grammars/fallback.py like llguidance's:
refused ones are relaxed with EOS gated on jsonschema, and exact ones are audited at EOS
(xgrammar on its own accepts a few invalid dev instances).
Special tokens other than the stop tokens are never allowed (xgrammar keeps them out of its
token trie); byte-level tokens are decoded to their raw bytes by TokenizerInfo.
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import TYPE_CHECKING, Any, Sequence

import xgrammar

from grammars.base import CompiledGrammar, CompilerOptions, check_bitmask_row
from grammars.fallback import compile_json_schema
from grammars.llguidance import ll_tokenizer
from grammars.spec import GrammarError, GrammarSpec

if TYPE_CHECKING:
    import torch

_COMPILERS: weakref.WeakKeyDictionary[Any, dict[int, xgrammar.GrammarCompiler]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _xgr_compiler(tokenizer: Any, vocab_size: int) -> xgrammar.GrammarCompiler:
    with _LOCK:
        per_size = _COMPILERS.setdefault(tokenizer, {})
        if vocab_size not in per_size:
            info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
            # Our compile pool already runs compiles concurrently; two threads inside each is enough here.
            per_size[vocab_size] = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        return per_size[vocab_size]


class XGrammarGrammar:
    """A request's cursor: an xgrammar GrammarMatcher."""

    __slots__ = ("_matcher", "_width")

    def __init__(self, matcher: xgrammar.GrammarMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._width = (vocab_size + 31) // 32

    def accept_token(self, token_id: int) -> bool:
        if self._matcher.is_terminated():
            return False
        return bool(self._matcher.accept_token(token_id))

    def accept(self, token_ids: Sequence[int]) -> bool:
        return all(self.accept_token(t) for t in token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        check_bitmask_row(bitmask, row, self._width * 32)
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self._matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def is_dead(self) -> bool:
        return False

    def forced_tokens(self) -> list[int]:
        # xgrammar reports a forced string, not tokens; retokenizing it is the engine's call
        # (the string may end mid-token), so no fast-forward tokens from this backend.
        return []

    def reset(self) -> None:
        self._matcher.reset()


class XGrammarCompiled:
    def __init__(self, spec: GrammarSpec, compiled: xgrammar.CompiledGrammar, vocab_size: int) -> None:
        self.spec = spec
        self.backend = "xgrammar"
        self.vocab_size = vocab_size
        self.notes: tuple[str, ...] = ()
        self._compiled = compiled

    def matcher(self) -> XGrammarGrammar:
        return XGrammarGrammar(xgrammar.GrammarMatcher(self._compiled, max_rollback_tokens=-1), self.vocab_size)


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, options: CompilerOptions) -> None:
        self.options = options
        self.vocab_size = vocab_size
        self.compiler = _xgr_compiler(tokenizer, vocab_size)
        self._llt = ll_tokenizer(tokenizer, vocab_size)  # exact token bytes for the jsonschema gate
        ws = options.max_whitespace
        self._json_kw: dict[str, Any] = ({"any_whitespace": False} if ws == 0
                                         else {"any_whitespace": True, "max_whitespace_cnt": ws})

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        if spec.kind == "json_schema":
            return compile_json_schema(spec, self.options, self.name, self._compile_schema,
                                       self._llt.decode_bytes, self._llt.eos_token)
        try:
            if spec.kind == "json_object":
                compiled = self.compiler.compile_json_schema('{"type": "object"}', strict_mode=False, **self._json_kw)
            elif spec.kind == "regex":
                compiled = self.compiler.compile_regex(spec.source)
            elif spec.kind == "choice":
                alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choices())
                compiled = self.compiler.compile_grammar(f"root ::= {alts}")
            elif spec.kind == "cfg":
                compiled = self.compiler.compile_grammar(xgrammar.Grammar.from_lark(spec.source))
            else:
                raise GrammarError(f"xgrammar cannot compile grammar kind {spec.kind!r}")
        except GrammarError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
            raise GrammarError(f"xgrammar cannot compile this {spec.kind}: {str(e).strip()[:500]}") from None
        return XGrammarCompiled(spec, compiled, self.vocab_size)

    def _compile_schema(self, spec: GrammarSpec, schema: Any, extra: dict[str, Any]) -> XGrammarCompiled:
        # `extra` holds llguidance's JSON options; xgrammar has no counterpart to use.
        try:
            compiled = self.compiler.compile_json_schema(json.dumps(schema), strict_mode=True, **self._json_kw)
        except Exception as e:
            raise GrammarError(str(e).strip()[:500]) from None
        return XGrammarCompiled(spec, compiled, self.vocab_size)
