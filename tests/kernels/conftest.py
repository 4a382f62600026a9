"""Kernel test fixtures: run Triton kernels on the CPU through Triton's interpreter.

kernels.backend picks compile-or-interpret at each launch, so setting the variables per test is
enough: no subprocess, nothing set at import, other tests in the same process unaffected.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route CPU tensors through the Triton kernels, interpreted."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PLUMBLINE_KERNELS", "triton")


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
