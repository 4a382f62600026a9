"""grammars.take_forced: fast-forward takes a token only where the mask allows it alone."""
from __future__ import annotations

import json
import random

from grammars import GrammarSpec, allocate_bitmask, take_forced
from tests.grammars.conftest import allowed_ids

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
                         "tags": {"type": "array", "maxItems": 2,
                                  "items": {"type": "string", "enum": ["alpha", "beta"]}}}}


def allowed(grammar, vocab: int) -> list[int]:
    mask = allocate_bitmask(1, vocab)
    grammar.fill_bitmask(mask, 0)
    return allowed_ids(mask, 0, vocab)


def test_forced_tokens_are_the_only_allowed_ones(tokenizer, compiler):
    compiled = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    scratch = allocate_bitmask(1, vocab)
    rng = random.Random(0)
    num_forced = 0
    for _ in range(6):             # random walks: sample a token, then take what is forced
        g, walk = compiled.matcher(), []          # walk: (token, forced?)
        while not g.is_terminated() and len(walk) < 60:
            token = rng.choice([t for t in allowed(g, vocab) if t != eos] or [eos])
            assert g.accept_token(token)
            walk.append((token, False))
            walk += [(t, True) for t in take_forced(g, 60 - len(walk), scratch)]
        # A second cursor replays the walk: wherever a token was forced, it was the only choice.
        replay = compiled.matcher()
        for token, forced in walk:
            if forced:
                assert allowed(replay, vocab) == [token], tokenizer.decode([token])
                num_forced += 1
            assert replay.accept_token(token)
    assert num_forced > 0, "each key of the schema is forced after its opening quote"


class _Claims:
    """A grammar whose backend claims a token is forced when the mask allows others too."""

    def __init__(self, inner, claim: list[int]) -> None:
        self.inner, self.claim = inner, claim

    def forced_tokens(self) -> list[int]:
        return self.claim

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_claimed_token_that_is_not_alone_is_not_taken(tokenizer, compiler):
    compiled = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    g = compiled.matcher()
    first = tokenizer('{"', add_special_tokens=False).input_ids
    assert len(allowed(g, len(tokenizer))) > 1 and first[0] in allowed(g, len(tokenizer))
    scratch = allocate_bitmask(1, len(tokenizer))
    assert take_forced(_Claims(g, first), 5, scratch) == []
    assert g.accept(first)          # nothing was consumed by the refusal
    name = tokenizer("name", add_special_tokens=False).input_ids
    assert take_forced(g, 0, scratch) == []                   # the limit holds
    assert take_forced(g, 5, scratch)[:len(name)] == name
