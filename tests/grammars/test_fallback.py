"""The fallback path: relaxed superset grammars with jsonschema gating EOS (grammars/fallback.py)."""
from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import torch

from grammars import CompilerOptions, GrammarCompiler, GrammarSpec
from grammars.fallback import ValidatedGrammar, relaxations
from tests.grammars.conftest import allowed_ids, encode, is_allowed

EOS = 2
# llguidance refuses oneOf; {"a": 5} matches both branches, so it is invalid; {"a": 1} is valid.
ONE_OF = {"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}, {"minimum": 3}]}},
          "required": ["a"]}
NOT_3 = {"type": "integer", "not": {"const": 3}}


def test_refused_schema_compiles_relaxed_with_a_note(compiler: Any) -> None:
    g = compiler.compile(GrammarSpec.json_schema(ONE_OF))
    assert g.notes and g.notes[0].startswith("relaxed (oneOf as anyOf")
    assert "oneOf constraints are not supported" in g.notes[0]
    assert isinstance(g.matcher(), ValidatedGrammar)


def test_eos_only_where_the_document_validates(compiler: Any, tokenizer: Any, bitmask: torch.Tensor) -> None:
    g = compiler.compile(GrammarSpec.json_schema(ONE_OF))
    good = g.matcher()
    assert good.accept(encode(tokenizer, '{"a":1}'))
    good.fill_bitmask(bitmask, 0)
    assert is_allowed(bitmask, 0, EOS) and good.is_terminated() and not good.is_dead()
    assert good.accept_token(EOS)

    bad = g.matcher()
    assert bad.accept(encode(tokenizer, '{"a":5}'))        # the relaxed grammar takes every token...
    bad.fill_bitmask(bitmask, 1)
    assert not is_allowed(bitmask, 1, EOS)                 # ...but EOS is masked out
    assert not bad.accept_token(EOS) and not bad.is_terminated()
    assert bad.is_dead() and allowed_ids(bitmask, 1, len(tokenizer)) == []   # a dead end, reported


def test_gate_on_a_scalar_top_level(compiler: Any, tokenizer: Any, bitmask: torch.Tensor) -> None:
    m = compiler.compile(GrammarSpec.json_schema(NOT_3)).matcher()
    assert m.accept(encode(tokenizer, "3"))
    m.fill_bitmask(bitmask, 0)
    assert not is_allowed(bitmask, 0, EOS) and not m.is_dead()   # "3" can still grow into "34"
    assert m.accept(encode(tokenizer, "4"))
    m.fill_bitmask(bitmask, 0)
    assert is_allowed(bitmask, 0, EOS) and m.accept_token(EOS)
    m.rollback(2)                                           # EOS and "4": back at "3"
    assert not m.accept_token(EOS)


def test_duplicate_keys_are_never_accepted(compiler: Any, tokenizer: Any) -> None:
    m = compiler.compile(GrammarSpec.json_schema({"type": "object"})).matcher()
    assert m.accept(encode(tokenizer, '{"a":1,"a":2}'))
    assert not m.accept_token(EOS)


def test_exact_grammars_are_gated_too_unless_disabled(tokenizer: Any) -> None:
    spec = GrammarSpec.json_schema({"type": "integer"})
    assert isinstance(GrammarCompiler(tokenizer).compile(spec).matcher(), ValidatedGrammar)
    plain = GrammarCompiler(tokenizer, options=CompilerOptions(always_validate=False))
    assert not isinstance(plain.compile(spec).matcher(), ValidatedGrammar)


@pytest.mark.parametrize("schema, instance", [
    (ONE_OF, {"a": 1}),
    ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": False,
      "properties": {"y": {"type": "string", "pattern": "^[a-z]+$", "format": "email"}}}, {"x1": 2, "y": "ab"}),
    ({"$defs": {"n": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/n", "minimum": 2},
      "uniqueItems": True, "contains": {"const": 4}}, [4, 5]),
    ({"allOf": [{"type": "string"}, {"not": {"const": "a"}}]}, "b"),
])
def test_relaxations_are_supersets(schema: Any, instance: Any) -> None:
    assert jsonschema.Draft202012Validator(schema).is_valid(instance)
    for note, relaxed, _ in relaxations(schema):
        assert jsonschema.Draft202012Validator(relaxed).is_valid(instance), note


def test_pattern_properties_dropped_with_additional_properties() -> None:
    schema = {"type": "object", "patternProperties": {"^x": {}}, "additionalProperties": False}
    dropped = [r for note, r, _ in relaxations(schema) if note == "constraint keywords dropped"][0]
    assert "patternProperties" not in dropped and "additionalProperties" not in dropped


def test_batched_fill_matches_row_by_row(compiler: Any, tokenizer: Any) -> None:
    from grammars import allocate_bitmask, fill_bitmasks

    plain = GrammarCompiler(tokenizer, options=CompilerOptions(always_validate=False))
    cursors = [compiler.compile(GrammarSpec.json_schema(ONE_OF)).matcher() for _ in range(3)]
    cursors.append(plain.compile(GrammarSpec.json_schema({"type": "integer"})).matcher())
    for m, text in zip(cursors, ['{"a":5}', '{"a":1}', '{"a":', "12"]):
        assert m.accept(encode(tokenizer, text))
    rows = [(m, row) for m, row in zip(cursors, [4, 0, 2, 5])]
    batched, single = allocate_bitmask(6, len(tokenizer)), allocate_bitmask(6, len(tokenizer))
    fill_bitmasks(batched, rows)
    for m, row in rows:
        m.fill_bitmask(single, row)
    assert torch.equal(batched, single)
    assert (batched[1] == -1).all() and (batched[3] == -1).all()      # unlisted rows untouched
    assert not batched[4].any()                                        # the dead end: '{"a":5}'
    assert is_allowed(batched, 0, EOS) and is_allowed(batched, 5, EOS)


class _RejectAll:
    def is_valid(self, instance: Any) -> bool:
        return False


def test_exact_grammars_are_audited_at_eos_not_in_the_mask(tokenizer: Any, bitmask: torch.Tensor) -> None:
    # Stand in for a backend bug: the exact grammar allows EOS, jsonschema disagrees.
    from grammars.llguidance import ll_tokenizer

    plain = GrammarCompiler(tokenizer, options=CompilerOptions(always_validate=False))
    llt = ll_tokenizer(tokenizer, len(tokenizer))
    inner = plain.compile(GrammarSpec.json_schema({"type": "integer"})).matcher()
    m = ValidatedGrammar(inner, _RejectAll(), llt.decode_bytes, EOS, gate_mask=False)
    assert m.accept(encode(tokenizer, "12"))
    m.fill_bitmask(bitmask, 0)
    assert is_allowed(bitmask, 0, EOS)                 # the mask is the backend's
    assert not m.accept_token(EOS)                     # the audit refuses the end
    assert not m.is_terminated()


def test_draft4_ref_siblings_are_ignored_as_the_draft_says(compiler: Any, tokenizer: Any) -> None:
    schema = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
              "properties": {"s": {"type": "string", "$ref": "#/definitions/obj"}},
              "definitions": {"obj": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
    g = compiler.compile(GrammarSpec.json_schema(schema))
    assert g.notes == ()                                   # exact, not relaxed
    m = g.matcher()
    assert m.accept(encode(tokenizer, '{"s":{"x":1}}')) and m.accept_token(EOS)
    assert not g.matcher().accept(encode(tokenizer, '{"s":"text"}'))
