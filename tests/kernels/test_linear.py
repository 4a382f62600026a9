from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.linear import linear, use_bf16


def test_choice_per_rows() -> None:
    assert not use_bf16(1, 576, 1728)           # matrix-vector: fp32
    assert use_bf16(2, 576, 1728) and use_bf16(256, 1536, 576)


@pytest.mark.parametrize("rows", [1, 2, 9])
def test_both_branches_agree_with_bf16_linear(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w16 = torch.randn(96, 64, generator=g).bfloat16()
    bias = torch.randn(96, generator=g).bfloat16()
    x = torch.randn(rows, 64, generator=g).bfloat16()
    out = linear(x, w16.float(), w16, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
    expected = F.linear(x.float(), w16.float(), bias.float())     # exact products, fp32 sums
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
