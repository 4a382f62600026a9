from __future__ import annotations

import pytest
import torch

from kernels import apply_token_bitmask
from kernels.logit_mask import _apply_cpu, _apply_triton, apply_token_bitmask_ref


def make(batch: int, vocab: int, extra_words: int = 0, seed: int = 0,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g).to(dtype)
    words = (vocab + 31) // 32 + extra_words
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch, words), generator=g, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    bitmask[0] = -1                                  # an unconstrained row
    if batch > 2:
        bitmask[2] = 0                               # nothing allowed
        bitmask[2, 0] = 1 << 5                       # ... but token 5
    return logits, bitmask


def test_reference_semantics() -> None:
    logits = torch.zeros(2, 40)
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    bitmask[0, 0] = (1 << 3) - 2**31           # tokens 3 and 31
    bitmask[0, 1] = 1 << 7                           # token 39
    bitmask[1, 0] = -1
    apply_token_bitmask_ref(logits, bitmask, rows=[0])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [3, 31, 39]
    assert torch.isfinite(logits[1]).all()           # not listed: untouched


@pytest.mark.parametrize("vocab", [32, 100, 1000, 49152 // 16 + 7])
@pytest.mark.parametrize("rows", [None, [1, 2], [3, 0, 2], []])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_path_matches_reference(vocab: int, rows: list[int] | None, dtype: torch.dtype) -> None:
    logits, bitmask = make(5, vocab, extra_words=2, dtype=dtype)
    expected = logits.clone()
    apply_token_bitmask_ref(expected, bitmask, rows)
    _apply_cpu(logits, bitmask, rows)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_cpu_path_nonfinite_logits_match_reference() -> None:
    # The CPU path writes -inf's bits over a disallowed logit, whatever it held: an added bias
    # would turn +inf into NaN there and keep a NaN.
    logits, bitmask = make(3, 96)
    logits[1, ::3] = float("inf")
    logits[1, 1::3] = float("nan")
    expected = logits.clone()
    apply_token_bitmask_ref(expected, bitmask)
    _apply_cpu(logits, bitmask, None)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0, equal_nan=True)
    disallowed = torch.isneginf(expected[1])
    assert disallowed.any() and torch.isneginf(logits[1][disallowed]).all()


def test_cpu_path_strided_logits_fall_back() -> None:
    logits, bitmask = make(4, 64)
    wide = torch.zeros(4, 128)
    view = wide[:, ::2]                              # vocab axis not contiguous
    view.copy_(logits)
    apply_token_bitmask_ref(logits, bitmask)
    _apply_cpu(view, bitmask, None)
    assert torch.equal(view, logits)


@pytest.mark.parametrize("rows", [[5], [-1], [0, 9]])
def test_cpu_path_rejects_rows_out_of_range(rows: list[int]) -> None:
    logits, bitmask = make(5, 64)
    before = logits.clone()
    with pytest.raises(IndexError):
        _apply_cpu(logits, bitmask, rows)
    assert torch.equal(logits, before)


def test_cpu_path_many_rows_and_tensor_rows() -> None:
    logits, bitmask = make(11, 333)
    expected = logits.clone()
    rows = torch.tensor([10, 1, 2, 3, 4, 5, 7, 9])
    apply_token_bitmask_ref(expected, bitmask, rows)
    apply_token_bitmask(logits, bitmask, rows)
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("vocab", [32, 100, 5000])
@pytest.mark.parametrize("rows", [None, [1, 3]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(interpret: None, vocab: int, rows: list[int] | None,
                                  dtype: torch.dtype) -> None:
    logits, bitmask = make(4, vocab, extra_words=1, dtype=dtype)
    expected = logits.clone()
    apply_token_bitmask_ref(expected, bitmask, rows)
    apply_token_bitmask(logits, bitmask, rows)       # dispatches to Triton under the fixture
    assert torch.equal(logits, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda(cuda: torch.device, dtype: torch.dtype) -> None:
    logits, bitmask = make(32, 49152, dtype=dtype)
    expected = logits.clone()
    apply_token_bitmask_ref(expected, bitmask, [0, 2, 5, 31])
    logits, bitmask = logits.to(cuda), bitmask.to(cuda)
    _apply_triton(logits, bitmask, [0, 2, 5, 31])
    assert torch.equal(logits.cpu(), expected)
