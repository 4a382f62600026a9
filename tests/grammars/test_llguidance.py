"""The llguidance adapter: accept/reject, rollback, termination, bitmask bits, EOS placement."""
from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from grammars import CompilerOptions, GrammarCompiler, GrammarError, GrammarSpec, allocate_bitmask
from tests.grammars.conftest import allowed_ids, encode, is_allowed

EOS = 2
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def _walk(m: Any, token_ids: list[int]) -> bool:
    return all(m.accept_token(t) for t in token_ids)


def test_accepts_a_valid_document_then_eos(compiler: Any, tokenizer: Any) -> None:
    m = compiler.compile(GrammarSpec.json_schema(PERSON)).matcher()
    assert m.accept(encode(tokenizer, '{"name":"Ada","age":36}'))
    assert m.is_terminated()          # the object is closed: nothing but EOS can follow
    assert m.accept_token(EOS)
    assert m.is_terminated()
    assert not m.accept_token(EOS)    # nothing after EOS, not even another one


def test_rejects_a_forbidden_token_without_losing_state(compiler: Any, tokenizer: Any) -> None:
    m = compiler.compile(GrammarSpec.json_schema(PERSON)).matcher()
    assert m.accept(encode(tokenizer, '{"name":"Ada","age":'))
    assert not m.accept_token(encode(tokenizer, '"')[0])   # a string where an integer goes
    assert not m.accept_token(EOS)
    assert m.accept(encode(tokenizer, "36}"))              # the cursor is where it was
    assert m.accept_token(EOS)


def test_accept_stops_at_the_first_forbidden_token(compiler: Any, tokenizer: Any) -> None:
    m = compiler.compile(GrammarSpec.json_schema({"type": "integer"})).matcher()
    assert not m.accept(encode(tokenizer, "12") + encode(tokenizer, "x"))
    assert m.accept_token(EOS)                             # "12" was taken


def test_rollback(compiler: Any, tokenizer: Any) -> None:
    m = compiler.compile(GrammarSpec.json_schema(PERSON)).matcher()
    ids = encode(tokenizer, '{"name":"Ada","age":36}')
    assert m.accept(ids) and m.accept_token(EOS)
    m.rollback(1)                                          # undo EOS
    assert m.accept_token(EOS)
    m.rollback(3)                                          # undo EOS, "}" and "6"
    assert not m.is_terminated() and not m.accept_token(EOS)
    assert m.accept(ids[-2:]) and m.accept_token(EOS)
    m.reset()
    assert m.accept(ids) and m.accept_token(EOS)


def test_bitmask_bits_and_eos_only_where_accepting(compiler: Any, tokenizer: Any, bitmask: torch.Tensor) -> None:
    m = compiler.compile(GrammarSpec.json_schema({"type": "integer"})).matcher()
    m.fill_bitmask(bitmask, 2)
    first = allowed_ids(bitmask, 2, len(tokenizer))
    assert EOS not in first
    decoded = {tokenizer.decode([t]) for t in first}
    assert "-" in decoded and "7" in decoded and '"' not in decoded
    assert all(tokenizer.decode([t]).lstrip()[:1] in "-0123456789" for t in first)
    assert (bitmask[[0, 1, 3]] == -1).all()                # other rows untouched
    m.accept(encode(tokenizer, "12"))
    m.fill_bitmask(bitmask, 2)
    assert is_allowed(bitmask, 2, EOS)
    for t in allowed_ids(bitmask, 2, len(tokenizer)):      # mask and accept_token agree
        assert m.accept_token(t), t
        m.rollback(1)


def test_forced_tokens(compiler: Any, tokenizer: Any) -> None:
    schema = {"type": "object", "properties": {"kind": {"const": "person"}, "n": {"type": "integer"}},
              "required": ["kind", "n"], "additionalProperties": False}
    m = compiler.compile(GrammarSpec.json_schema(schema)).matcher()
    # Whitespace may follow "{", so only once the key has begun is its name forced; llguidance
    # stops short of bytes a longer token could still absorb (the closing quote).
    assert m.accept(encode(tokenizer, '{"'))
    forced = m.forced_tokens()
    assert tokenizer.decode(forced) == "kind"
    assert m.accept(forced)
    assert m.accept(encode(tokenizer, '":"person","n":7}')) and m.accept_token(EOS)
    assert m.forced_tokens() == []


def test_special_tokens_never_inside_strings(compiler: Any, tokenizer: Any, bitmask: torch.Tensor) -> None:
    m = compiler.compile(GrammarSpec.json_schema(PERSON)).matcher()
    assert m.accept(encode(tokenizer, '{"name":"'))
    m.fill_bitmask(bitmask, 0)
    allowed = set(allowed_ids(bitmask, 0, len(tokenizer)))
    assert len(allowed) > 10_000                           # a string admits most of the vocabulary
    assert not allowed & set(tokenizer.all_special_ids)


@pytest.mark.parametrize("text", ["𝄞 clef", "你好", "café"])
def test_partial_utf8_tokens_keep_their_bytes(compiler: Any, tokenizer: Any, text: str) -> None:
    ids = encode(tokenizer, json.dumps({"name": text, "age": 1}, ensure_ascii=False, separators=(",", ":")))
    m = compiler.compile(GrammarSpec.json_schema(PERSON)).matcher()
    assert m.accept(ids) and m.accept_token(EOS)


def test_whitespace_is_bounded(tokenizer: Any) -> None:
    spec = GrammarSpec.json_schema(PERSON)
    bounded = GrammarCompiler(tokenizer, options=CompilerOptions(max_whitespace=4)).compile(spec)
    assert _walk(bounded.matcher(), encode(tokenizer, '{\n  "name": "a",\n  "age": 1\n}'))
    assert not _walk(bounded.matcher(), encode(tokenizer, '{' + " " * 5 + '"name":"a","age":1}'))
    compact = GrammarCompiler(tokenizer, options=CompilerOptions(max_whitespace=0)).compile(spec)
    assert not _walk(compact.matcher(), encode(tokenizer, '{ "name":"a","age":1}'))
    assert _walk(compact.matcher(), encode(tokenizer, '{"name":"a","age":1}'))


@pytest.mark.parametrize("spec, good, bad", [
    (GrammarSpec("regex", r"[0-9]{2}-[a-z]+"), "12-abc", "1-abc"),
    (GrammarSpec.choice(["yes", "no way"]), "no way", "nope"),
    (GrammarSpec("json_object", ""), '{"x":[1,{"y":null}]}', "[1]"),
    (GrammarSpec("cfg", 'start: "a" b\nb: "b"+'), "abbb", "ba"),
])
def test_other_kinds(compiler: Any, tokenizer: Any, spec: GrammarSpec, good: str, bad: str) -> None:
    g = compiler.compile(spec)
    m = g.matcher()
    assert m.accept(encode(tokenizer, good)) and m.accept_token(EOS) and m.is_terminated()
    m = g.matcher()
    assert not (m.accept(encode(tokenizer, bad)) and m.accept_token(EOS))


def test_true_schema_is_any_json_exactly(compiler: Any, tokenizer: Any) -> None:
    g = compiler.compile(GrammarSpec.json_schema(True))
    assert g.notes == ()
    m = g.matcher()
    assert m.accept(encode(tokenizer, '[1,"a",{"b":null}]')) and m.accept_token(EOS)


def test_compile_errors_name_the_problem(tokenizer: Any) -> None:
    exact = GrammarCompiler(tokenizer, options=CompilerOptions(json_fallback=False, always_validate=False))
    with pytest.raises(GrammarError, match="unsupported json_schema: .*oneOf"):
        exact.compile(GrammarSpec.json_schema({"oneOf": [{"type": "integer"}, {"minimum": 3}]}))
    with pytest.raises(GrammarError, match="invalid grammar: .*unknown name"):
        exact.compile(GrammarSpec("cfg", "start: a\na: b"))


def test_padded_vocab_ids_are_never_allowed(tokenizer: Any) -> None:
    vocab_size = len(tokenizer) + 64                        # a model with padded embeddings
    c = GrammarCompiler(tokenizer, vocab_size=vocab_size)
    bitmask = allocate_bitmask(1, vocab_size)
    m = c.compile(GrammarSpec("json_object", "")).matcher()
    m.accept(encode(tokenizer, '{"a":"'))
    m.fill_bitmask(bitmask, 0)
    assert max(allowed_ids(bitmask, 0, vocab_size)) < len(tokenizer)


def test_matchers_are_independent(compiler: Any, tokenizer: Any) -> None:
    g = compiler.compile(GrammarSpec.json_schema(PERSON))
    a, b = g.matcher(), g.matcher()
    assert a.accept(encode(tokenizer, '{"name":"x","age":1}'))
    assert not b.is_terminated() and b.accept(encode(tokenizer, '{"name"'))
