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
it with AMX only (its bf32 kernels); the setting is process-wide, so it is set around the one
call (the engine computes logits on one thread, and no other thread runs fp32 matmuls meanwhile).

Without AMX, oneDNN would compute the same products with fp32 FMA, so the split head runs
through our panel GEMM instead (kernels/linear.py), on panels kept in bf16: the parts are bf16
values, so nothing is lost, the weight takes the fp32 head's bytes, and a decode step stays in
numba's thread pool. A oneDNN call inside a step of numba kernels left torch's OpenMP threads
spinning against numba's on 2 cores: forward passes of 1-2 s instead of ~50 ms in the first
steps here (not with OMP_WAIT_POLICY=PASSIVE). Either way slower than the fp32 head without AMX
(docs/BENCHMARKS.md), which is why `--head-precision auto` never picks it there.

One GEMM computes all four products: the rows [x_hi; x_lo] against the weight rows
[w_hi; w_lo], [2T, hidden] x [2V, hidden]^T -> [2T, 2V], then three fp32 adds. Against the
issue's three products with K tripled ([x_hi | x_hi | x_lo] . [w_hi | w_lo | w_hi]) this reads
2/3 of the weight bytes (oneDNN keeps an fp32-mode weight in fp32), which is what a decode step
waits on, and the fourth product only costs rows. AMX flushes bf16 denormals; a weight whose
lo part is below 1e-38 is far below anything a logit can show.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kernels.backend import cpu_flags, panel_linear
from kernels.calibrate import calibrate_panels, medians_ms
from kernels.linear import (PACK_ROWS_HINT, PANEL, _flat, apply_linear, pack_panels, panel_gemm,
                            prepare_linear)


@dataclass(slots=True)
class SplitHead:
    """[w_hi; w_lo] of a [vocab, hidden] weight: fp32 values in oneDNN's blocked layout (with
    AMX), or bf16 panels for the panel GEMM (without)."""

    shape: torch.Size                      # [vocab, hidden]
    packed: torch.Tensor | None = None     # [2 * vocab, hidden] (blocked), every value a bf16
    panels: torch.Tensor | None = None     # ... or [2 * vocab / PANEL, hidden, PANEL] in bf16
    panel_data: np.ndarray | None = None   # the panels' memory as the numba kernel takes it

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32      # what its logits are, and as accurate as


def split_bf16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 t -> (hi, lo): bf16 values held in fp32, t = hi + lo + r with |r| <= 2^-16 |t|."""
    hi = t.bfloat16().float()
    return hi, (t - hi).bfloat16().float()


def prepare_split_head(weight: torch.Tensor, onednn: bool | None = None) -> SplitHead:
    """Split the head's weight [vocab, hidden] once (at load and on every weights update).
    onednn: the GEMM to use; None: oneDNN where the CPU has AMX (or no panels fit)."""
    hi, lo = split_bf16(weight.float())
    parts = torch.cat([hi, lo])                                     # [2 * vocab, hidden]
    if onednn is None:
        onednn = "amx_bf16" in cpu_flags() or not panel_linear() or parts.shape[0] % PANEL != 0
    if onednn:
        packed = torch.ops.mkldnn._reorder_linear_weight(parts.contiguous(), PACK_ROWS_HINT)
        return SplitHead(weight.shape, packed=packed)
    panels = pack_panels(parts, torch.bfloat16)                     # exact: bf16 values
    return SplitHead(weight.shape, panels=panels, panel_data=_flat(panels))


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
    x = torch.cat([x_hi, x_lo])                                         # [2T, hidden]
    if head.panels is not None:
        out = panel_gemm(x, head.panels, None, head.panel_data)         # [2T, 2V]
    else:
        with _bf16_products():
            out = torch.ops.mkldnn._linear_pointwise(x, head.packed, None, "none", [], "")
    # the small products first, then the large one: fp32 adds, never rounded to bf16
    return out[:rows, :vocab] + ((out[:rows, vocab:] + out[rows:, :vocab]) + out[rows:, vocab:])


def split_is_faster(weight: torch.Tensor, rows: int, repeats: int = 5) -> tuple[bool, float, float]:
    """Time the fp32 head and the split head on this CPU for `rows` rows: (split wins, fp32 ms,
    split ms). Through oneDNN (as with AMX) the split weight is kept in fp32, twice the fp32
    head's bytes, so whether the matrix units make up for it is measured, not assumed. The fp32
    head is timed as the engine would run it at `rows`: on its panels, or on oneDNN where that
    measures faster (calibrate_panels)."""
    fp32, split = prepare_linear(weight.float().contiguous()), prepare_split_head(weight)
    calibrate_panels(fp32, (rows,), repeats)
    x = torch.randn(rows, weight.shape[1])
    t32, tsplit = medians_ms((lambda: apply_linear(x, fp32), lambda: split_head_logits(x, split)),
                              repeats)
    return tsplit < t32, t32, tsplit
