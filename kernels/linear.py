"""Linear layers of a bf16 body, run in fp32 or bf16 depending on the number of rows.

On this CPU a bf16 matmul beats fp32 once there are enough rows to amortise oneDNN's bf16
packing, but a bf16 matrix-vector product is slower than the fp32 one. So a bf16
model keeps each weight twice (bf16, and the same values in fp32: exact, bf16 widens losslessly)
and picks per call. The fp32 branch multiplies the same bf16 values and rounds its output to
bf16, so both branches agree to bf16 rounding (accumulation order aside).

Crossover measured on this machine (benchmarks/kernels_bench.py, docs/BENCHMARKS.md "Kernels"):
`MIN_BF16_ROWS` below. `calibrate` re-measures it on the machine at hand.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

# (in_features, out_features) -> the smallest number of rows at which bf16 is used. Measured
# with `calibrate` here (torch 2.13 CPU, 1 and 2 threads, SmolLM2-135M shapes): fp32 wins only
# the matrix-vector product (1 row: bf16 1.1x-1.5x slower); from 2 rows on bf16 wins, ~2x from
# 8 rows. Shapes not listed use DEFAULT_MIN_BF16_ROWS.
MIN_BF16_ROWS: dict[tuple[int, int], int] = {
    (576, 1728): 2,      # qkv
    (576, 576): 2,       # o_proj
    (576, 3072): 2,      # gate_up
    (1536, 576): 2,      # down
}
DEFAULT_MIN_BF16_ROWS = 2


def use_bf16(num_rows: int, in_features: int, out_features: int) -> bool:
    """Whether a [num_rows, in] x [out, in]^T product should run in bf16."""
    threshold = MIN_BF16_ROWS.get((in_features, out_features), DEFAULT_MIN_BF16_ROWS)
    return num_rows >= threshold


def linear(x: torch.Tensor, weight_fp32: torch.Tensor, weight_bf16: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] bf16 -> [T, out] bf16, computed in whichever dtype is faster for T rows."""
    out_features, in_features = weight_bf16.shape
    num_rows = x.numel() // in_features
    if x.is_cuda or use_bf16(num_rows, in_features, out_features):
        return F.linear(x, weight_bf16, bias)
    out = F.linear(x.float(), weight_fp32, None if bias is None else bias.float())
    return out.to(x.dtype)


def _median_ms(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


def calibrate(shapes: list[tuple[int, int]], rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
              repeats: int = 10) -> dict[tuple[int, int], int]:
    """Measure the fp32/bf16 crossover of each (in, out) shape here; update MIN_BF16_ROWS."""
    found = {}
    for in_features, out_features in shapes:
        w32 = torch.randn(out_features, in_features)
        w16 = w32.bfloat16()
        threshold = rows[-1] * 2
        for n in rows:
            x = torch.randn(n, in_features).bfloat16()
            t16 = _median_ms(lambda: F.linear(x, w16), repeats)
            t32 = _median_ms(lambda: F.linear(x.float(), w32).bfloat16(), repeats)
            if t16 < t32:
                threshold = n
                break
        found[(in_features, out_features)] = threshold
    MIN_BF16_ROWS.update(found)
    return found
