"""The Grammar protocol, the same behaviour from every backend (llguidance, outlines-core, xgrammar)."""
from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from grammars import GrammarCompiler, GrammarError, GrammarSpec
from tests.grammars.conftest import allowed_ids, encode, is_allowed

EOS = 2
SCHEMA = GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                                  "required": ["a"], "additionalProperties": False})
BACKENDS = [
    pytest.param("llguidance"),
    pytest.param("outlines_core", marks=pytest.mark.skipif(
        importlib.util.find_spec("outlines_core") is None, reason="outlines-core not installed")),
    pytest.param("xgrammar", marks=pytest.mark.skipif(
        importlib.util.find_spec("xgrammar") is None, reason="xgrammar not installed")),
]


@pytest.fixture(scope="module", params=BACKENDS)
def backend_compiler(request: Any, tokenizer: Any) -> Any:
    c = GrammarCompiler(tokenizer, backend=request.param)
    yield c
    c.close()


@pytest.mark.parametrize("spec, good, bad", [
    (SCHEMA, '{"a":12,"b":"héllo"}', '{"a":"x"}'),
    (GrammarSpec("regex", r"[0-9]{2}-[a-z]+"), "12-abc", "1-abc"),
    (GrammarSpec.choice(["yes", "no way"]), "no way", "nope"),
])
def test_accept_reject_terminate(backend_compiler: Any, tokenizer: Any, spec: GrammarSpec, good: str, bad: str) -> None:
    g = backend_compiler.compile(spec)
    m = g.matcher()
    assert not m.is_terminated() and not m.accept_token(EOS)
    assert m.accept(encode(tokenizer, good))
    assert m.accept_token(EOS) and m.is_terminated()
    assert not m.accept_token(encode(tokenizer, "1")[0])
    m = g.matcher()
    assert not (m.accept(encode(tokenizer, bad)) and m.accept_token(EOS))


def test_bitmask_matches_accept_and_eos_only_where_accepting(backend_compiler: Any, tokenizer: Any) -> None:
    bitmask = torch.full((3, (len(tokenizer) + 31) // 32), -1, dtype=torch.int32)
    m = backend_compiler.compile(SCHEMA).matcher()
    for t in encode(tokenizer, '{"a":12'):
        m.fill_bitmask(bitmask, 1)
        assert is_allowed(bitmask, 1, t) and not is_allowed(bitmask, 1, EOS)
        assert m.accept_token(t)
    m.fill_bitmask(bitmask, 1)
    allowed = allowed_ids(bitmask, 1, len(tokenizer))
    assert encode(tokenizer, "}")[0] in allowed and encode(tokenizer, '"')[0] not in allowed
    assert EOS not in allowed
    assert m.accept(encode(tokenizer, "}"))
    m.fill_bitmask(bitmask, 1)
    assert is_allowed(bitmask, 1, EOS)
    assert not set(allowed_ids(bitmask, 1, len(tokenizer))) & (set(tokenizer.all_special_ids) - {EOS})
    assert (bitmask[[0, 2]] == -1).all()


def test_rollback(backend_compiler: Any, tokenizer: Any) -> None:
    m = backend_compiler.compile(SCHEMA).matcher()
    ids = encode(tokenizer, '{"a":12}')
    assert m.accept(ids) and m.accept_token(EOS)
    m.rollback(2)                                  # EOS and "}"
    assert not m.is_terminated() and not m.accept_token(EOS)
    assert m.accept(ids[-1:]) and m.accept_token(EOS)


def test_cfg(backend_compiler: Any, tokenizer: Any) -> None:
    spec = GrammarSpec("cfg", 'start: "a" b\nb: "b"+')
    if backend_compiler.backend == "outlines_core":
        with pytest.raises(GrammarError, match="outlines_core supports"):
            backend_compiler.compile(spec)
        return
    m = backend_compiler.compile(spec).matcher()
    assert m.accept(encode(tokenizer, "abbb")) and m.accept_token(EOS)
