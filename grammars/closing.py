"""Budget-aware closing: when a constrained sequence nears max_tokens, steer it to finish.

A small model can loop inside a JSON string or array, or nest objects without end, until
max_tokens cuts the structure off, and a cut structure does not parse. When a sequence's budget
left is down to `reserve` tokens (at most half of max_tokens) plus one per open bracket, its
grammar mask is narrowed each step to the first tier of "closing" tokens the grammar allows
(once a JSON value or a tool call has begun: free text before one is left alone):

    outside a JSON string:  EOS  >  tokens starting "}", "]" or "</"  >  '"'  >  ","
    inside a JSON string:   '"' then a closing bracket  >  '"' alone  >  any token starting '"'

When the grammar allows none of a tier's tokens, the next tier is tried; when it allows none at
all, the mask stays as the grammar made it (the model writes what the grammar demands, e.g. a
required key). The grammar still decides what is valid; this only prefers the shortest way out.
Processed logprobs are those of the narrowed distribution (what was actually sampled from).

Where the text stands (inside a string, how many brackets are open) is read from the generated
text itself by the JSON lexer (json_lexer.py) over the decoded tokens, restarted at each
`<tool_call>` tag. Free text is never steered: where the grammar allows it (tools with
tool_choice "auto", `GrammarSpec.free_text`), only a tag opens a structure, so a `{`, `[` or `"`
in an answer is text, not JSON to close. It is a heuristic: it shortens, it cannot promise to
close within the budget (a schema may require more tokens than are left). A sequence whose mask
it narrowed says so (`JsonScan.steered`): the response marks the choice `closed_early`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from grammars.json_lexer import CLOSE, OPEN, JsonLexer
from grammars.tools import OPEN_TAG

_CLOSERS = ("}", "]", "</")


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """bool [vocab] -> int32 [ceil(vocab/32)] bitmask (bit i of word w = token 32*w + i)."""
    words = (allowed.numel() + 31) // 32
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[:allowed.numel()] = allowed.to(torch.int64)
    packed = (bits.view(words, 32) << torch.arange(32, dtype=torch.int64)).sum(1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


@dataclass(slots=True)
class JsonScan:
    """Where one sequence's output stands for closing (tokens are only ever appended): the
    JSON lexer's state, restarted at each `<tool_call>` tag."""

    num_tokens: int = 0      # tokens scanned so far
    in_structure: bool = False  # a JSON value or a tool call has begun (free text before it
                                # is never steered: closing would only cut an answer short)
    tail: str = ""           # the last few characters, to spot a `<tool_call>` tag
    lexer: JsonLexer = field(default_factory=JsonLexer)
    free_text: bool = False  # the output may be free text: only a tag opens a structure
    steered: bool = False    # closing narrowed a mask of this sequence at least once

    @property
    def in_string(self) -> bool:
        return self.lexer.in_string

    @property
    def depth(self) -> int:
        """Open brackets outside strings."""
        return self.lexer.depth

    def feed(self, text: str) -> None:
        for ch in text:
            self.step(ch)

    def step(self, ch: str) -> bool:
        """Advance one character; True when it closes a top-level JSON value."""
        self.tail = (self.tail + ch)[-len(OPEN_TAG):]
        if self.tail == OPEN_TAG:                  # a call starts: its JSON is what counts
            self.lexer.reset()
            self.in_structure = True
            return False
        if self.free_text and not self.in_structure:
            return False                           # text before any call: not JSON to close
        depth = self.lexer.depth
        lexeme = self.lexer.step(ch)
        if lexeme is OPEN:
            self.in_structure = True
        return lexeme is CLOSE and depth == 1


def effective_reserve(reserve: int, max_tokens: int) -> int:
    """At most half the budget: a parallel tool call must not start a call it cannot end."""
    return min(reserve, max_tokens // 2)


def is_due(state: JsonScan, tokens_left: int, reserve: int) -> bool:
    """Closing narrows the mask now: a structure has begun and the budget left is down to the
    reserve plus one token per open bracket (free text before any structure is never steered)."""
    return (state.in_structure or state.in_string) and tokens_left <= reserve + state.depth


class ClosingVocab:
    """The token tiers of one tokenizer, built once (one decode of the vocabulary)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        n = min(vocab_size, len(tokenizer))
        self.texts = [str(t) for t in tokenizer.batch_decode([[i] for i in range(n)])]
        self.texts += [""] * (vocab_size - n)

        def tier(test: Any) -> torch.Tensor:
            return _pack(torch.tensor([bool(test(t)) for t in self.texts]))

        eos = torch.zeros(vocab_size, dtype=torch.bool)
        eos[[i for i in eos_token_ids if 0 <= i < vocab_size]] = True
        self.outside = [_pack(eos),
                        tier(lambda t: t.lstrip().startswith(_CLOSERS)),
                        tier(lambda t: t.lstrip().startswith('"')),
                        tier(lambda t: t.lstrip().startswith(","))]
        # Inside a string only the quote itself ends it (whitespace before it is string text).
        self.inside = [tier(lambda t: t.startswith('"') and t[1:].lstrip().startswith(_CLOSERS)),
                       tier(lambda t: t.startswith('"') and not t[1:].strip()),
                       tier(lambda t: t.startswith('"'))]

    def scan(self, state: JsonScan | None, completion_ids: Sequence[int], free_text: bool = False) -> JsonScan:
        """Bring a sequence's scan up to date with its output (a new one when None, for an
        output that may be free text before its first tag when `free_text`)."""
        state = state or JsonScan(free_text=free_text)
        state.feed("".join(self.texts[t] for t in completion_ids[state.num_tokens:]))
        state.num_tokens = len(completion_ids)
        return state

    def narrow(self, bitmask: torch.Tensor, row: int, state: JsonScan) -> None:
        """Keep only the first tier of closing tokens that bitmask[row] allows (nothing changes
        in free text before any structure)."""
        if not (state.in_structure or state.in_string):
            return
        for tier in self.inside if state.in_string else self.outside:
            narrowed = bitmask[row] & tier
            if bool(narrowed.any()):
                state.steered = state.steered or not torch.equal(narrowed, bitmask[row])
                bitmask[row] = narrowed
                return
