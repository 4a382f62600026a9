"""benchmarks/prefill.py on the tiny model: every prompt gets its first token in each round, in
as many steps as the budget cuts the prompts into, and the table has one row per budget."""
from __future__ import annotations

import pytest

import kernels.attention
from benchmarks import prefill
from engine.config import DEFAULT_MODEL


def test_rounds_give_every_prompt_its_first_token_in_the_budgets_steps(tiny_model_dir, capsys):
    prefill.main(["--model", str(tiny_model_dir), "--dtype", "float32", "--seqs", "3",
                  "--prompt-tokens", "20", "--budgets", "16", "64", "--rounds", "2",
                  "--attention", "in-place", "sdpa"])
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 16 ") or line.startswith("| 64 ")]
    assert [(r[0], r[1]) for r in rows] == [("16", "in-place"), ("16", "sdpa"),
                                            ("64", "in-place"), ("64", "sdpa")]
    # 3 prompts of 20 tokens: 60 prompt tokens in steps of 16, or in one step of 64
    assert [int(r[2]) for r in rows] == [4, 4, 1, 1]
    for _, _, _, wall, p50, rate in rows:
        assert 0 < float(p50) <= float(wall) and float(rate) > 0
    assert kernels.attention.PREFILL_IN_PLACE       # the engine's default is back


def test_without_model_it_loads_the_default_model(monkeypatch):
    # EngineConfig is a slots dataclass: its class attribute `model` is a slot descriptor, not
    # the default string (the command once passed that descriptor on and failed at load).
    seen = []

    class Loaded(Exception):
        pass

    def engine(config):
        seen.append(config.model)
        raise Loaded

    monkeypatch.setattr(prefill, "EngineCore", engine)
    with pytest.raises(Loaded):
        prefill.main(["--seqs", "1", "--budgets", "16", "--rounds", "1"])
    assert seen == [DEFAULT_MODEL]
