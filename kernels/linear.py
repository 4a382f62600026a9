"""Linear layers: the weight as the fast path wants it, and one call that picks the path.

fp32 on the CPU. torch's `F.linear` calls MKL's sgemm on the plain [out, in] weight; oneDNN on a
weight reordered once into its blocked layout ("prepacked", what torch.compile's CPU freezing
does) is faster for every SmolLM2 shape from 2 rows on here: 1.2-2.8x on the body's GEMMs and
1.3-3.3x on the 49152-wide lm_head (at 32 rows 49 ms -> 23 ms). `benchmarks/kernels_bench.py
--only linear` measures both; docs/BENCHMARKS.md has the figures. Deterministic mode never packs
(kernels.invariant reads the plain weights); a packed fp32 layer drops its plain copy, which
would hold as much memory again.

bf16 body. Whether a bf16 matmul beats fp32 depends on the CPU: with native bf16 (AVX512-BF16,
AMX) it won from 2 rows on; on an AVX2-only CPU (this session's AMD EPYC) it ran at ~16 GFLOP/s
against ~90 for fp32 at every row count. So a bf16 layer also keeps the same values in fp32
(exact: bf16 widens losslessly), prepacked, and `MIN_BF16_ROWS` says from how many rows bf16 is
used; the engine re-measures it with `calibrate` when it loads a bf16 body. The fp32 branch
rounds its output to bf16, so both branches agree to bf16 rounding (accumulation order aside).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.backend import prepack_linear

# oneDNN picks its blocked layout for an expected row count. 32 was as fast as or faster than 1
# and 512 for 1-64 rows, and within noise for a 512-row prefill chunk.
PACK_ROWS_HINT = 32

# (in_features, out_features) -> the smallest number of rows at which bf16 is used. The defaults
# were measured with `calibrate` on a CPU with native bf16 (torch 2.13, SmolLM2-135M shapes):
# fp32 won only the matrix-vector product. Shapes not listed use DEFAULT_MIN_BF16_ROWS.
MIN_BF16_ROWS: dict[tuple[int, int], int] = {
    (576, 960): 2,       # qkv
    (576, 576): 2,       # o_proj
    (576, 3072): 2,      # gate_up
    (1536, 576): 2,      # down
}
DEFAULT_MIN_BF16_ROWS = 2


@dataclass(slots=True)
class LinearWeight:
    """One layer's weight [out, in] (and bias) in the body's dtype, plus its fast-path form."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    packed: torch.Tensor | None = None     # the weight's values in fp32, oneDNN's blocked layout

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


def prepare_linear(weight: torch.Tensor, bias: torch.Tensor | None = None,
                   pack: bool = True) -> LinearWeight:
    """Wrap a weight for `apply_linear`, prepacking it where the oneDNN path is available.

    A packed fp32 weight keeps no plain copy, which would hold as much memory again: what is
    left of it is a meta tensor (its shape and dtype, no data). A bf16 weight is kept, as its
    bf16 branch reads it. pack=False (deterministic mode: kernels.invariant reads the plain
    weights) keeps the plain weight only."""
    packed = None
    if pack and not weight.is_cuda and prepack_linear():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.float().contiguous(), PACK_ROWS_HINT)
        if weight.dtype == torch.float32:
            weight = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
    return LinearWeight(weight, bias, packed)


def use_bf16(num_rows: int, in_features: int, out_features: int) -> bool:
    """Whether a [num_rows, in] x [out, in]^T product of a bf16 layer should run in bf16."""
    threshold = MIN_BF16_ROWS.get((in_features, out_features), DEFAULT_MIN_BF16_ROWS)
    return num_rows >= threshold


def _onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def apply_linear(x: torch.Tensor, layer: LinearWeight) -> torch.Tensor:
    """x [T, in] -> [T, out], in x's dtype (which is the layer's)."""
    if layer.packed is None or x.is_cuda:
        return F.linear(x, layer.weight, layer.bias)
    if x.dtype == torch.float32:
        return _onednn(x, layer.packed, layer.bias)
    out_features, in_features = layer.shape
    if use_bf16(x.numel() // in_features, in_features, out_features):
        return F.linear(x, layer.weight, layer.bias)
    return linear_fp32(x, layer).to(x.dtype)


def _median_ms(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


NEVER = 1 << 62     # a threshold no row count reaches: this shape always runs in fp32


def calibrate(shapes: list[tuple[int, int]], rows: tuple[int, ...] = (1, 2, 8, 32, 128, 512),
              repeats: int = 5) -> dict[tuple[int, int], int]:
    """Measure the fp32/bf16 crossover of each (in, out) shape here; update MIN_BF16_ROWS.

    The threshold is the smallest of `rows` from which bf16 wins at every larger count tried
    (largest first, up to a prefill chunk). Without native bf16, a one-row bf16 product can tie
    fp32 while 8 rows already run 3x slower, so a first win from below would be misleading."""
    found = {}
    for in_features, out_features in shapes:
        layer = prepare_linear(torch.randn(out_features, in_features).bfloat16())
        threshold = NEVER
        for n in sorted(rows, reverse=True):
            x = torch.randn(n, in_features).bfloat16()
            t16 = _median_ms(lambda: F.linear(x, layer.weight), repeats)
            t32 = _median_ms(lambda: linear_fp32(x, layer).bfloat16(), repeats)
            if t16 >= t32:
                break
            threshold = n
        found[(in_features, out_features)] = threshold
    MIN_BF16_ROWS.update(found)
    return found


def linear_fp32(x: torch.Tensor, layer: LinearWeight) -> torch.Tensor:
    """The fp32 branch of a layer whatever its dtype: x [T, in] -> fp32 [T, out]."""
    bias = None if layer.bias is None else layer.bias.float()
    if layer.packed is not None and not x.is_cuda:
        return _onednn(x.float(), layer.packed, bias)
    return F.linear(x.float(), layer.weight.float(), bias)
