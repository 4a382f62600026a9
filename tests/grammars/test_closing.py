"""Budget-aware closing: the tiers it narrows a mask to, and, on the real model, structures that
close within max_tokens where the unsteered run is cut off."""
from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from grammars.base import bitmask_width
from grammars.closing import ClosingVocab, JsonScan, _pack

VOCAB = ['"', "}", "]", ",", "a", " b", ' "', "</tool_call>", "<tool_call>", '"}', "<eos>", "\\", "{"]
EOS = VOCAB.index("<eos>")


class _Tok:
    def __len__(self) -> int:
        return len(VOCAB)

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return ["".join(VOCAB[i] for i in seq) for seq in ids]


def ids(*texts: str) -> list[int]:
    return [VOCAB.index(t) for t in texts]


def allowed(row: torch.Tensor) -> set[str]:
    bits = [(int(row[t // 32]) >> (t % 32)) & 1 for t in range(len(VOCAB))]
    return {VOCAB[t] for t, b in enumerate(bits) if b}


def mask_of(tokens: set[str]) -> torch.Tensor:
    return _pack(torch.tensor([t in tokens for t in VOCAB])).view(1, bitmask_width(len(VOCAB)))


@pytest.fixture(scope="module")
def vocab() -> ClosingVocab:
    return ClosingVocab(_Tok(), len(VOCAB), [EOS])


def scan(vocab: ClosingVocab, *texts: str) -> JsonScan:
    return vocab.scan(None, ids(*texts))


def test_the_scan_reads_strings_and_depth_from_the_text(vocab: ClosingVocab) -> None:
    assert scan(vocab, '"', "a").in_string
    assert not scan(vocab, '"', "a", '"').in_string
    assert scan(vocab, '"', "\\", '"').in_string                 # an escaped quote
    assert not scan(vocab, '"', "<tool_call>", "a").in_string       # free text before the call
    assert scan(vocab, "<tool_call>", '"', "a").in_string
    assert scan(vocab, "<tool_call>", '"', "}", "]").depth == 0     # brackets in a string
    assert scan(vocab, "}", "<tool_call>", ' "', '"}').depth == 0


def test_the_scan_is_incremental(vocab: ClosingVocab) -> None:
    tokens = ids("<tool_call>", '"', "a", '"}', ",", ' "', "\\", '"', "]")
    state = None
    for k in range(1, len(tokens) + 1):
        state = vocab.scan(state, tokens[:k])
        whole = vocab.scan(None, tokens[:k])
        assert (state.in_string, state.depth) == (whole.in_string, whole.depth)


@pytest.mark.parametrize("generated, grammar_allows, kept", [
    (['"', "a"], {"a", " b", '"', '"}', "}", ","}, {'"}'}),       # in a string: quote + bracket
    (['"', "a"], {"a", " b", '"', "}", ","}, {'"'}),               # or the quote alone
    (["{", "a"], {"a", "}", ",", '"', "<eos>"}, {"<eos>"}),          # EOS first
    (["{", "a"], {"a", "}", "]", ",", '"'}, {"}", "]"}),             # then closing brackets
    (["<tool_call>", "a"], {"a", "</tool_call>", '"'}, {"</tool_call>"}),  # or a closing tag
    (["{", "a"], {"a", ' "', ","}, {' "'}),                          # then a quote
    (["{", "a"], {"a", ","}, {","}),                                 # then a comma
    (["{", "a"], {"a", " b"}, {"a", " b"}),                          # nothing closes: unchanged
    (["a"], {"a", "<eos>", "<tool_call>"}, {"a", "<eos>", "<tool_call>"}),  # free text: unchanged
])
def test_narrow_keeps_the_first_tier_the_grammar_allows(vocab: ClosingVocab, generated: list[str],
                                                        grammar_allows: set[str], kept: set[str]) -> None:
    mask = mask_of(grammar_allows)
    vocab.narrow(mask, 0, scan(vocab, *generated))
    assert allowed(mask[0]) == kept


@pytest.mark.slow
def test_structures_close_within_max_tokens_on_the_real_model(default_llm: Any) -> None:
    """A list the model would go on with: cut without closing, whole and valid with it."""
    import jsonschema

    from engine import SamplingParams
    from grammars import GrammarSpec

    schema = {"type": "object", "properties": {"primes": {"type": "array", "items": {"type": "integer"}}},
              "required": ["primes"], "additionalProperties": False}
    prompt = default_llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "List the first 1000 prime numbers as JSON."}],
        tokenize=False, add_generation_prompt=True)
    spec = GrammarSpec("json_schema", json.dumps(schema))
    params = [SamplingParams(max_tokens=48, temperature=0.0, grammar=spec, close_reserve=r)
              for r in (0, 12)]
    off, on = [o.outputs[0] for o in default_llm.generate([prompt, prompt], params)]
    assert off.finish_reason == "length"          # the list outlasts the budget
    with pytest.raises(json.JSONDecodeError):
        json.loads(off.text)
    assert on.finish_reason == "stop" and len(on.token_ids) <= 48
    jsonschema.validate(json.loads(on.text), schema)
    # Identical until closing begins (the reserve plus one token per open bracket before the
    # end): it changes only the last tokens.
    assert on.token_ids[:48 - 12 - 4] == off.token_ids[:48 - 12 - 4]
