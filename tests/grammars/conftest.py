"""Fixtures for the grammar layer: the default model's tokenizer and compilers over it."""
from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    import transformers

    from engine.loader import resolve_model

    return transformers.AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def compiler(tokenizer: Any) -> Any:
    from grammars import GrammarCompiler

    c = GrammarCompiler(tokenizer, backend="llguidance")
    yield c
    c.close()


@pytest.fixture()
def bitmask(tokenizer: Any) -> Any:
    from grammars import allocate_bitmask

    return allocate_bitmask(4, len(tokenizer))


def allowed_ids(bitmask: Any, row: int, vocab_size: int) -> list[int]:
    """The token ids whose bit is set in bitmask[row] (bit j of word w = token 32*w + j)."""
    import numpy as np

    words = bitmask[row].numpy().view(np.uint32)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits).tolist()


def is_allowed(bitmask: Any, row: int, token_id: int) -> bool:
    return bool((int(bitmask[row, token_id // 32]) >> (token_id % 32)) & 1)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))
