"""Constrained decoding's decisions around a step, in one object the engine calls.

- after a sampled token: did the grammar take it, is the structure complete, or is it dead
  (a relaxed fallback grammar whose finished document failed its schema);
- fast-forward: the tokens the grammar forces next, appended without a sampling step;
- budget-aware closing: narrow a row's mask to closing tokens when the budget runs low.

The scheduler and the runner keep no grammar policy of their own: they hand over a sequence's
grammar and plain numbers, and act on what comes back.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from grammars.base import Grammar, allocate_bitmask, take_forced
from grammars.closing import ClosingVocab, JsonScan, effective_reserve, is_due
from grammars.spec import GrammarSpec


class TokenVerdict(enum.Enum):
    ACCEPTED = "accepted"      # the grammar goes on
    COMPLETE = "complete"      # the structure is complete: the sequence stops
    DEAD = "dead"              # no token may follow and the document fails its schema
    REJECTED = "rejected"      # the grammar refused a token its own mask allowed: a bug


class Steering:
    """One per engine. `fast_forward` and `close_reserve` are the server's settings; a request
    may set its own close reserve."""

    def __init__(self, vocab_size: int, *, fast_forward: bool = True, close_reserve: int = 48,
                 tokenizer: Any = None, eos_token_ids: Iterable[int] = ()) -> None:
        self.vocab_size = vocab_size
        self.fast_forward = fast_forward
        self.close_reserve = close_reserve
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self._scratch: torch.Tensor | None = None          # one bitmask row for take_forced
        self._closing_vocab: ClosingVocab | None = None

    def accept(self, grammar: Grammar, token_id: int) -> TokenVerdict:
        """Advance the grammar by a sampled token."""
        if not grammar.accept_token(token_id):
            return TokenVerdict.REJECTED
        if grammar.is_terminated():
            return TokenVerdict.COMPLETE
        if grammar.is_dead():
            return TokenVerdict.DEAD
        return TokenVerdict.ACCEPTED

    def forced(self, grammar: Grammar, limit: int, is_raw: bool) -> list[int]:
        """Accept and return up to `limit` tokens the grammar forces (grammars.take_forced).
        None in raw-logprobs mode: a raw logprob needs the model's logits at the forced
        position, which fast-forward never computes."""
        if not self.fast_forward or is_raw or limit <= 0:
            return []
        if self._scratch is None:
            self._scratch = allocate_bitmask(1, self.vocab_size)
        return take_forced(grammar, limit, self._scratch)

    def closing_vocab(self) -> ClosingVocab:
        """Built on first use: one decode of the vocabulary (about a second)."""
        if self._closing_vocab is None:
            assert self.tokenizer is not None, "budget-aware closing needs the tokenizer"
            self._closing_vocab = ClosingVocab(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._closing_vocab

    def close_if_due(self, scan: JsonScan | None, bitmask: torch.Tensor, row: int,
                     completion_ids: Sequence[int], max_tokens: int,
                     close_reserve: int | None, spec: GrammarSpec | None = None) -> JsonScan | None:
        """Budget-aware closing (grammars/closing.py): once the budget left is down to the
        reserve plus one token per open bracket, narrow bitmask[row] to closing tokens.
        `spec`: the sequence's grammar (its free text is never steered). Returns the
        sequence's scan state, to hand back next step (`steered` once it narrowed a mask)."""
        reserve = effective_reserve(self.close_reserve if close_reserve is None else close_reserve,
                                    max_tokens)
        if reserve <= 0:
            return scan
        vocab = self.closing_vocab()
        scan = vocab.scan(scan, completion_ids, free_text=spec is not None and spec.free_text)
        if is_due(scan, max_tokens - len(completion_ids), reserve):
            vocab.narrow(bitmask, row, scan)
        return scan
