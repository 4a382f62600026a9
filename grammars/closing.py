"""Budget-aware closing: when a constrained sequence nears max_tokens, steer it to finish.

A small model can loop inside a JSON string or array until max_tokens cuts the structure off,
and a cut structure does not parse. When a sequence has `reserve` tokens of budget left, its
grammar mask is narrowed each step to the first tier of "closing" tokens the grammar allows:

    outside a JSON string:  EOS  >  tokens starting "}", "]" or "</"  >  '"'  >  ","
    inside a JSON string:   tokens starting '"' (the closing quote)

When the grammar allows none of a tier's tokens, the next tier is tried; when it allows none at
all, the mask stays as the grammar made it (the model writes what the grammar demands, e.g. a
required key). The grammar still decides what is valid; this only prefers the shortest way out.
Processed logprobs are those of the narrowed distribution (what was actually sampled from).

Whether the text is inside a string is read from the generated text itself (a JSON string
scanner over the decoded tokens, restarted after the last `<tool_call>` tag so free text before
a call does not count). The narrowing is a heuristic: it shortens, it cannot promise to close
within the reserve (a schema may require more tokens than are left).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from grammars.tools import OPEN_TAG

_OUTSIDE_TIERS = (("}", "]", "</"), ('"',), (",",))


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """bool [vocab] -> int32 [ceil(vocab/32)] bitmask (bit i of word w = token 32*w + i)."""
    words = (allowed.numel() + 31) // 32
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[:allowed.numel()] = allowed.to(torch.int64)
    packed = (bits.view(words, 32) << torch.arange(32, dtype=torch.int64)).sum(1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


class ClosingVocab:
    """The token tiers of one tokenizer, built once (one decode of the vocabulary)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        n = min(vocab_size, len(tokenizer))
        self.texts = [str(t) for t in tokenizer.batch_decode([[i] for i in range(n)])]
        self.texts += [""] * (vocab_size - n)
        stripped = [t.lstrip() for t in self.texts]

        def tier(prefixes: Sequence[str]) -> torch.Tensor:
            return _pack(torch.tensor([s.startswith(tuple(prefixes)) for s in stripped]))

        eos = torch.zeros(vocab_size, dtype=torch.bool)
        eos[[i for i in eos_token_ids if 0 <= i < vocab_size]] = True
        self.outside = [_pack(eos)] + [tier(p) for p in _OUTSIDE_TIERS]
        # Inside a string only the quote itself ends it ('"' after whitespace is still text).
        self.inside = [_pack(torch.tensor([t.startswith('"') for t in self.texts]))]

    def in_string(self, completion_ids: Sequence[int]) -> bool:
        """Whether the generated text ends inside a JSON string."""
        text = "".join(self.texts[t] for t in completion_ids)
        at = text.rfind(OPEN_TAG)
        if at >= 0:
            text = text[at + len(OPEN_TAG):]
        inside = escaped = False
        for ch in text:
            if escaped:
                escaped = False
            elif inside and ch == "\\":
                escaped = True
            elif ch == '"':
                inside = not inside
        return inside

    def narrow(self, bitmask: torch.Tensor, row: int, completion_ids: Sequence[int]) -> None:
        """Keep only the first tier of closing tokens that bitmask[row] allows."""
        tiers = self.inside if self.in_string(completion_ids) else self.outside
        for tier in tiers:
            narrowed = bitmask[row] & tier
            if bool(narrowed.any()):
                bitmask[row] = narrowed
                return
