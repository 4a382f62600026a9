"""The split-bf16 lm_head (kernels/split_head.py) on random matrices: fp32-accurate against an
fp64 product, where a plain bf16 head is not (the negative control that lets the test fail)."""
from __future__ import annotations

import pytest
import torch

from kernels.backend import prepack_linear
from kernels.linear import apply_linear, prepare_linear
from kernels.split_head import prepare_split_head, split_bf16, split_head_logits
from tests.engine.reference import SPLIT_HEAD_BOUND, worst_relative_error

pytestmark = pytest.mark.skipif(not prepack_linear(), reason="torch has no oneDNN prepacking")


def test_split_parts_are_bf16_and_leave_2_pow_minus_16() -> None:
    t = torch.randn(4096) * torch.logspace(-6, 6, 4096)
    hi, lo = split_bf16(t)
    assert torch.equal(hi, hi.bfloat16().float()) and torch.equal(lo, lo.bfloat16().float())
    assert ((t.double() - hi.double() - lo.double()).abs() <= 2.0 ** -16 * t.double().abs()).all()


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "panels"])
@pytest.mark.parametrize("rows", [1, 5, 32])
def test_split_head_is_fp32_accurate_and_bf16_is_not(rows: int, onednn: bool) -> None:
    """Both GEMMs: oneDNN in its bf16 math mode (AMX's; fp32 FMA elsewhere) and our panels."""
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(2400, 576, generator=g) * 0.05          # vocab 2400 x hidden 576
    x = torch.randn(rows, 576, generator=g) * 3
    head = prepare_split_head(weight, onednn)
    assert (head.packed is not None) == onednn and (head.panels is not None) != onednn
    split = split_head_logits(x, head)
    assert split.dtype == torch.float32 and split.shape == (rows, 2400)
    assert worst_relative_error(split, x, weight) <= SPLIT_HEAD_BOUND
    fp32 = apply_linear(x, prepare_linear(weight.clone()))
    assert worst_relative_error(fp32, x, weight) <= SPLIT_HEAD_BOUND
    # the negative control: bf16 operands, fp32 accumulation and output (measured ~2^-11 here,
    # the split ~2^-20)
    bf16 = x.bfloat16().float() @ weight.bfloat16().float().T
    assert worst_relative_error(bf16, x, weight) > 4 * SPLIT_HEAD_BOUND
    # and the split head agrees with the fp32 head to a few fp32 ulps of the logits' scale
    assert (split - fp32).abs().max().item() <= 1e-5 * (x.abs() @ weight.abs().T).max().item()


def test_split_head_takes_a_bf16_input_and_leaves_fp32_settings_alone() -> None:
    weight = torch.randn(96, 64)
    x = torch.randn(3, 64).bfloat16()
    before = torch.backends.mkldnn.matmul.fp32_precision
    logits = split_head_logits(x, prepare_split_head(weight, onednn=True))
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    assert worst_relative_error(logits, x.float(), weight) <= SPLIT_HEAD_BOUND
