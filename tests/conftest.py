"""Shared fixtures: the real default model (converted once per machine, loaded once per run) and
tiny random llama models for unit tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# JSONSchemaBench files the suite needs, in the repository (tests/data/README.md); larger opt-in
# runs read ../shared.
VENDORED_SCHEMAS = Path(__file__).resolve().parent / "data" / "jsonschemabench"
NUM_VENDORED_BFCL = 12
NUM_VENDORED_FIRST = 40


def schema_dir(count: int, vendored: int) -> Path:
    """Where `count` schema files come from: the vendored copy when it holds them, else
    ../shared/jsonschemabench/dev (a test that needs it skips when it is absent)."""
    return VENDORED_SCHEMAS if count <= vendored else SHARED / "jsonschemabench" / "dev"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from engine.loader import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def default_llm():
    from engine import LLM

    return LLM()


@pytest.fixture(scope="session")
def hf_default_model(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    return model.eval()


def make_tiny_llama(path: Path, default_model_dir: Path, **overrides) -> Path:
    """A random llama small enough for unit tests, with the default model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    cfg = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


def pytest_configure(config) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
