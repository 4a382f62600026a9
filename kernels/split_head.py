"""The lm_head as a sum of bf16 products: fp32-accurate logits from bf16 matrix units.

Each fp32 operand is split into two bf16 parts, v = hi + lo + r with hi = bf16(v) and
lo = bf16(v - hi) (v - hi is exact in fp32). bf16 keeps 8 significant bits, so |v - hi| <= 2^-8 |v|
and the remainder |r| <= 2^-16 |v|. A product of two bf16 values is exact in fp32 (8 x 8 bits
fit in 24), so with fp32 accumulation

    x . w ~ x_hi . w_hi + (x_hi . w_lo + x_lo . w_hi + x_lo . w_lo)

misses only what the remainders carry: per logit at most ~2^-15 * sum_i |x_i| |w_i|, plus the
fp32 accumulation error an fp32 head has too. A plain bf16 head (one part each) is off by up to
2^-7 of that sum. tests/kernels/test_split_head.py checks both against an fp64 product.

torch 2.13 offers no CPU product of bf16 tensors with an fp32 result (`torch.mm(..., out_dtype=)`
and inductor's lowering of it are CUDA/XPU only; bf16 matmuls round their output to bf16, which
would undo the split). What it has is oneDNN's fpmath mode bf16 (torch's
`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`): fp32 tensors in and out, and oneDNN may
round the inputs to bf16 and accumulate in fp32. Our inputs already hold bf16 values, so that
rounding is exact and the result is the same whether oneDNN takes it or not. oneDNN 3.12 takes
it with AMX (its bf32 kernels); on a CPU without AMX it computes the same products with fp32
FMA, correct and slower than the fp32 head (docs/BENCHMARKS.md). The setting is process-wide, so
it is set around the one call: the engine computes logits on one thread, and no other thread
runs fp32 matmuls meanwhile.

One GEMM computes all four products: the rows [x_hi; x_lo] against the weight rows
[w_hi; w_lo], [2T, hidden] x [2V, hidden]^T -> [2T, 2V], then three fp32 adds. Against the
brief's three products with K tripled ([x_hi | x_hi | x_lo] . [w_hi | w_lo | w_hi]) this reads
2/3 of the weight bytes (oneDNN keeps an fp32-mode weight in fp32), which is what a decode step
waits on, and the fourth product only costs rows. AMX flushes bf16 denormals; a weight whose
lo part is below 1e-38 is far below anything a logit can show.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kernels.linear import PACK_ROWS_HINT, _median_ms, apply_linear, prepare_linear


@dataclass(slots=True)
class SplitHead:
    """[w_hi; w_lo] of a [vocab, hidden] weight, as fp32 values in oneDNN's blocked layout."""

    packed: torch.Tensor         # [2 * vocab, hidden] (blocked), every value a bf16
    shape: torch.Size            # [vocab, hidden]

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32      # what its logits are, and as accurate as


def split_bf16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 t -> (hi, lo): bf16 values held in fp32, t = hi + lo + r with |r| <= 2^-16 |t|."""
    hi = t.bfloat16().float()
    return hi, (t - hi).bfloat16().float()


def prepare_split_head(weight: torch.Tensor) -> SplitHead:
    """Split the head's weight [vocab, hidden] once (at load and on every weights update)."""
    hi, lo = split_bf16(weight.float())
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat([hi, lo]).contiguous(),
                                                     PACK_ROWS_HINT)
    return SplitHead(packed, weight.shape)


@contextlib.contextmanager
def _bf16_products() -> Iterator[None]:
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def split_head_logits(hidden: torch.Tensor, head: SplitHead) -> torch.Tensor:
    """hidden [T, hidden] (any float dtype) -> logits [T, vocab] in fp32."""
    x_hi, x_lo = split_bf16(hidden.float())
    rows, vocab = x_hi.shape[0], head.shape[0]
    with _bf16_products():
        out = torch.ops.mkldnn._linear_pointwise(torch.cat([x_hi, x_lo]), head.packed, None,
                                                 "none", [], "")              # [2T, 2V]
    # the small products first, then the large one: fp32 adds, never rounded to bf16
    return out[:rows, :vocab] + ((out[:rows, vocab:] + out[rows:, :vocab]) + out[rows:, vocab:])


def split_is_faster(weight: torch.Tensor, rows: int, repeats: int = 5) -> tuple[bool, float, float]:
    """Time the fp32 head and the split head on this CPU for `rows` rows: (split wins, fp32 ms,
    split ms). The split head's weight is kept in fp32 (twice the fp32 head's bytes), so
    whether the matrix units make up for it is measured, not assumed."""
    fp32, split = prepare_linear(weight.float().contiguous()), prepare_split_head(weight)
    x = torch.randn(rows, weight.shape[1])
    t32 = _median_ms(lambda: apply_linear(x, fp32), repeats)
    tsplit = _median_ms(lambda: split_head_logits(x, split), repeats)
    return tsplit < t32, t32, tsplit
