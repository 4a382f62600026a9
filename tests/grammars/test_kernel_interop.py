"""The bitmask the grammars fill is the one kernels.apply_token_bitmask reads (same bit layout)."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from grammars import GrammarSpec, allocate_bitmask, fill_bitmasks

kernels = pytest.importorskip("kernels")
if not hasattr(kernels, "apply_token_bitmask"):
    pytest.skip("kernels.apply_token_bitmask not available", allow_module_level=True)


def test_masked_argmax_is_always_accepted(compiler: Any, tokenizer: Any) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    grammars = [compiler.compile(GrammarSpec.json_schema(schema)).matcher() for _ in range(3)]
    vocab = len(tokenizer)
    bitmask = allocate_bitmask(4, vocab)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        live = [(g, row) for row, g in enumerate(grammars) if not g.is_terminated()]
        if not live:
            break
        bitmask.fill_(-1)
        fill_bitmasks(bitmask, live)
        logits = torch.randn(4, vocab, generator=gen)               # [4, vocab]; row 3 unconstrained
        kernels.apply_token_bitmask(logits, bitmask)
        assert torch.isfinite(logits[3]).all()
        for g, row in live:
            assert g.accept_token(int(logits[row].argmax()))
