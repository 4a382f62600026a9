"""bf16 layers' decode-sized products on the dot-product instruction of AVX512-BF16.

vdpbf16ps adds to each fp32 lane the two products of a pair of bf16 values: twice the
multiply-adds of an fp32 FMA per instruction. oneDNN's bf16 product uses it too, but on a SmolLM2
body's four layer shapes, weights read from memory as in a decode step, our kernel below is
faster at 1-8 rows and even from 16 (kernels_bench --only body; docs/BENCHMARKS.md). So where
the CPU has the instruction, a bf16 layer's panels are kept in the pair layout below, and its
products below the bf16 crossover (kernels.linear.calibrate) run here instead of widening to
fp32. The arithmetic is the same: a product of two bf16 values is exact in fp32 and the sums are
fp32, so only their order differs (and bf16 denormals, which the instruction reads as zero).

Layout: panel p of 48 output columns holds, for each pair of input features (2k, 2k + 1), 96
bf16 values: column c's pair at [2c, 2c + 1], so one 512-bit load is the pairs of 16 columns.
The microkernel computes 8 rows x 48 columns in 24 of AVX-512's 32 registers (+ 3 weights + 1
broadcast pair), over the whole input (the panel stays in L2 across the row blocks), and writes
the output in bf16, rounded once, or in fp32, eight lanes at a time. A product of one or two
rows takes a 2-row microkernel, which does not compute 8.
512-bit registers: Zen 5 and Intel's server cores execute a 512-bit instruction at the rate of a
256-bit one, so 8 x 48 in 512-bit registers does twice the work per instruction of the 8 x 24
block in 256-bit ones that this kernel had before. On Zen 5 (2 vCPUs) that block took 0.64-0.72x
of the old one's time from 16 rows, the same at 1-8 (bound by memory). Zen 4 splits a 512-bit
instruction in two 256-bit halves, the old block's rate: not measured here since the change (no
Zen 4 box), expected even. Before that, on Zen 4: 4 x 24, 4 x 48, 6 x 32 and 8 x 24 blocks of
256-bit registers, the input whole or in chunks; 8 x 24 whole was fastest; prefetching the next
panel made no difference above the noise. The vector intrinsics are kernels/simd_bf16.py's.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from kernels.backend import numba_threads
from kernels.simd import add8, broadcast8, div8, exp8, load8, mul8, store8, sub8, zeros8, zeros16
from kernels.simd_bf16 import dot_pairs, high8, load_pairs, low8, round8, splat_pair, store_rounded8

PANEL = 48      # output columns per panel: three 16-lane vectors

_NO_BIAS = np.zeros(0, np.float32)
_NO_GATE = np.zeros((8, PANEL), np.float32)       # _store's scratch, unused by mode 0


def pack_pairs(weight: torch.Tensor) -> torch.Tensor:
    """bf16 [out, in] -> [out / PANEL, in / 2, PANEL, 2]: panel p, pair row k holds
    W[24p + c, 2k : 2k + 2] for c in 0..23. out a multiple of PANEL, in even."""
    out_features, in_features = weight.shape
    assert out_features % PANEL == 0 and in_features % 2 == 0
    return (weight.to(torch.bfloat16).reshape(out_features // PANEL, PANEL, in_features // 2, 2)
            .permute(0, 2, 1, 3).contiguous())


@njit(nogil=True, boundscheck=False, inline="always")
def _silu_times(g, u):  # type: ignore[no-untyped-def]
    """bf16(silu(g)) * bf16(u), g already bf16-valued: where torch's bf16 F.silu(gate) * up
    rounds (silu as x / (1 + exp(-x)) in fp32, as torch's CPU kernel computes it; its exp and
    exp8 agree to an ulp of fp32, which the bf16 rounding hides but for rare ties)."""
    s = round8(div8(g, add8(broadcast8(np.float32(1.0)), exp8(sub8(zeros8(), g)))))
    return mul8(s, round8(u))


@njit(nogil=True, boundscheck=False, inline="always")
def _finish(v, g, off, bias, n0, mode):  # type: ignore[no-untyped-def]
    """Eight of a row's sums (columns n0 + off ..): mode 1 (a gate panel) keeps their bf16
    values in the block's scratch row g; mode 2 (the up panel after it) makes them silu(gate) *
    up; then the bias. Returns what _store writes (mode 0 and 2)."""
    if mode == 1:
        store8(g, off, round8(v))
        return v
    if mode == 2:
        v = _silu_times(load8(g, off), v)
    if bias.shape[0]:
        v = add8(v, load8(bias, n0 + off))
    return v


@njit(nogil=True, boundscheck=False, inline="always")
def _store(out, bias, r, n0, a, b, c, mode, gate, rl):  # type: ignore[no-untyped-def]
    """Row r's 48 sums a, b, c at column n0 of out, eight lanes at a time (_finish; mode 1
    writes only the scratch row gate[rl])."""
    g, row = gate[rl], out[r]
    for off, v in ((0, low8(a)), (8, high8(a)), (16, low8(b)), (24, high8(b)), (32, low8(c)),
                   (40, high8(c))):
        v = _finish(v, g, off, bias, n0, mode)
        if mode != 1:
            store_rounded8(row, n0 + off, v)


@njit(nogil=True, boundscheck=False, cache=True)
def _rows8(x, m0, rows, wp, base, pairs, out, n0, bias, mode, gate):  # type: ignore[no-untyped-def]
    """out[m0 : m0 + rows, n0 : n0 + 48] = x[m0 : m0 + rows] @ the panel at wp[base:] (+ bias);
    rows <= 8. Missing rows repeat row m0: computed, never stored. mode, gate: _store's."""
    c00 = zeros16(); c01 = zeros16(); c02 = zeros16(); c10 = zeros16(); c11 = zeros16(); c12 = zeros16()  # noqa: E702,E501
    c20 = zeros16(); c21 = zeros16(); c22 = zeros16(); c30 = zeros16(); c31 = zeros16(); c32 = zeros16()  # noqa: E702,E501
    c40 = zeros16(); c41 = zeros16(); c42 = zeros16(); c50 = zeros16(); c51 = zeros16(); c52 = zeros16()  # noqa: E702,E501
    c60 = zeros16(); c61 = zeros16(); c62 = zeros16(); c70 = zeros16(); c71 = zeros16(); c72 = zeros16()  # noqa: E702,E501
    x0, x1 = x[m0], x[m0 + min(1, rows - 1)]
    x2, x3 = x[m0 + min(2, rows - 1)], x[m0 + min(3, rows - 1)]
    x4, x5 = x[m0 + min(4, rows - 1)], x[m0 + min(5, rows - 1)]
    x6, x7 = x[m0 + min(6, rows - 1)], x[m0 + min(7, rows - 1)]
    for k in range(pairs):
        at, i = base + k * 2 * PANEL, 2 * k
        w0 = load_pairs(wp, at); w1 = load_pairs(wp, at + 32); w2 = load_pairs(wp, at + 64)  # noqa: E702
        b = splat_pair(x0, i)
        c00 = dot_pairs(c00, w0, b); c01 = dot_pairs(c01, w1, b); c02 = dot_pairs(c02, w2, b)  # noqa: E702
        b = splat_pair(x1, i)
        c10 = dot_pairs(c10, w0, b); c11 = dot_pairs(c11, w1, b); c12 = dot_pairs(c12, w2, b)  # noqa: E702
        b = splat_pair(x2, i)
        c20 = dot_pairs(c20, w0, b); c21 = dot_pairs(c21, w1, b); c22 = dot_pairs(c22, w2, b)  # noqa: E702
        b = splat_pair(x3, i)
        c30 = dot_pairs(c30, w0, b); c31 = dot_pairs(c31, w1, b); c32 = dot_pairs(c32, w2, b)  # noqa: E702
        b = splat_pair(x4, i)
        c40 = dot_pairs(c40, w0, b); c41 = dot_pairs(c41, w1, b); c42 = dot_pairs(c42, w2, b)  # noqa: E702
        b = splat_pair(x5, i)
        c50 = dot_pairs(c50, w0, b); c51 = dot_pairs(c51, w1, b); c52 = dot_pairs(c52, w2, b)  # noqa: E702
        b = splat_pair(x6, i)
        c60 = dot_pairs(c60, w0, b); c61 = dot_pairs(c61, w1, b); c62 = dot_pairs(c62, w2, b)  # noqa: E702
        b = splat_pair(x7, i)
        c70 = dot_pairs(c70, w0, b); c71 = dot_pairs(c71, w1, b); c72 = dot_pairs(c72, w2, b)  # noqa: E702
    _store(out, bias, m0, n0, c00, c01, c02, mode, gate, 0)
    if rows > 1:
        _store(out, bias, m0 + 1, n0, c10, c11, c12, mode, gate, 1)
    if rows > 2:
        _store(out, bias, m0 + 2, n0, c20, c21, c22, mode, gate, 2)
    if rows > 3:
        _store(out, bias, m0 + 3, n0, c30, c31, c32, mode, gate, 3)
    if rows > 4:
        _store(out, bias, m0 + 4, n0, c40, c41, c42, mode, gate, 4)
    if rows > 5:
        _store(out, bias, m0 + 5, n0, c50, c51, c52, mode, gate, 5)
    if rows > 6:
        _store(out, bias, m0 + 6, n0, c60, c61, c62, mode, gate, 6)
    if rows > 7:
        _store(out, bias, m0 + 7, n0, c70, c71, c72, mode, gate, 7)


@njit(nogil=True, boundscheck=False, cache=True)
def _rows2(x, m0, rows, wp, base, pairs, out, n0, bias, mode, gate):  # type: ignore[no-untyped-def]
    """_rows8 for rows <= 2."""
    c00 = zeros16(); c01 = zeros16(); c02 = zeros16(); c10 = zeros16(); c11 = zeros16(); c12 = zeros16()  # noqa: E702,E501
    x0, x1 = x[m0], x[m0 + min(1, rows - 1)]
    for k in range(pairs):
        at, i = base + k * 2 * PANEL, 2 * k
        w0 = load_pairs(wp, at); w1 = load_pairs(wp, at + 32); w2 = load_pairs(wp, at + 64)  # noqa: E702
        b = splat_pair(x0, i)
        c00 = dot_pairs(c00, w0, b); c01 = dot_pairs(c01, w1, b); c02 = dot_pairs(c02, w2, b)  # noqa: E702
        b = splat_pair(x1, i)
        c10 = dot_pairs(c10, w0, b); c11 = dot_pairs(c11, w1, b); c12 = dot_pairs(c12, w2, b)  # noqa: E702
    _store(out, bias, m0, n0, c00, c01, c02, mode, gate, 0)
    if rows > 1:
        _store(out, bias, m0 + 1, n0, c10, c11, c12, mode, gate, 1)


@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _dot_gemm(x, wp, out, bias, threads):  # type: ignore[no-untyped-def]
    rows, pairs = x.shape[0], x.shape[1] // 2
    panels = out.shape[1] // PANEL
    per_thread = (panels + threads - 1) // threads
    for t in prange(threads):       # each thread a contiguous run of panels
        for p in range(t * per_thread, min(panels, (t + 1) * per_thread)):
            base = p * pairs * 2 * PANEL
            for m0 in range(0, rows, 8):
                _block(x, m0, wp, base, pairs, out, p * PANEL, bias, 0, _NO_GATE)


@njit(nogil=True, boundscheck=False, inline="always")
def _block(x, m0, wp, base, pairs, out, n0, bias, mode, gate):  # type: ignore[no-untyped-def]
    rows = x.shape[0] - m0
    if rows <= 2:
        _rows2(x, m0, rows, wp, base, pairs, out, n0, bias, mode, gate)
    else:
        _rows8(x, m0, min(8, rows), wp, base, pairs, out, n0, bias, mode, gate)


@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _dot_gemm_silu(x, wp, out, threads):  # type: ignore[no-untyped-def]
    """out [T, I] = silu(x @ gate^T) * (x @ up^T), the weight's panels gate, up, gate, up, ...
    (gate_up_order): each 8-row block's gate sums wait in a scratch block for its up panel."""
    rows, pairs = x.shape[0], x.shape[1] // 2
    blocks = out.shape[1] // PANEL
    per_thread = (blocks + threads - 1) // threads
    for t in prange(threads):
        gate = np.empty((8, PANEL), np.float32)
        for m in range(t * per_thread, min(blocks, (t + 1) * per_thread)):
            base = 2 * m * pairs * 2 * PANEL
            for m0 in range(0, rows, 8):
                _block(x, m0, wp, base, pairs, out, m * PANEL, _NO_BIAS, 1, gate)
                _block(x, m0, wp, base + pairs * 2 * PANEL, pairs, out, m * PANEL, _NO_BIAS, 2, gate)


def dot_gemm(x: torch.Tensor, pairs: torch.Tensor, bias: torch.Tensor | None = None,
             pairs_data: np.ndarray | None = None,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """bf16 x [T, in] @ the packed weight -> [T, out] in out_dtype (bf16: the fp32 sum, plus the
    bias, rounded once; or fp32). pairs_data: `flat(pairs)`, if the caller keeps it."""
    num_panels, half_in, width, two = pairs.shape
    in_features = 2 * half_in
    assert width == PANEL and two == 2 and x.shape[-1] == in_features
    assert x.dtype == torch.bfloat16 and out_dtype in (torch.bfloat16, torch.float32)
    if x.dim() != 2 or not x.is_contiguous():
        x = x.reshape(-1, in_features).contiguous()
    out = torch.empty(x.shape[0], num_panels * PANEL, dtype=out_dtype)
    if x.shape[0]:
        out_array = out.view(torch.int16).numpy() if out_dtype == torch.bfloat16 else out.numpy()
        bias_array = _NO_BIAS if bias is None else bias.float().contiguous().numpy()
        _dot_gemm(x.view(torch.int16).numpy(), flat(pairs) if pairs_data is None else pairs_data,
                  out_array, bias_array, numba_threads())
    return out


def gate_up_order(out_features: int) -> torch.Tensor:
    """The row order of a [gate; up] weight (out_features = 2 I, I a multiple of PANEL) whose
    panels alternate: gate rows 24m..24m+23, then up rows 24m..24m+23, for each m."""
    half = out_features // 2
    blocks = torch.arange(half).view(-1, PANEL)
    return torch.stack([blocks, blocks + half], 1).reshape(-1)


def dot_silu(x: torch.Tensor, pairs: torch.Tensor, pairs_data: np.ndarray | None = None) -> torch.Tensor:
    """silu(gate) * up for bf16 x [T, in] and a [gate; up] weight packed in gate_up_order:
    bf16 [T, I], rounded where torch's bf16 ops round (the sums, silu, the product)."""
    num_panels, half_in, width, two = pairs.shape
    assert width == PANEL and two == 2 and num_panels % 2 == 0 and x.shape[-1] == 2 * half_in
    assert x.dtype == torch.bfloat16
    if x.dim() != 2 or not x.is_contiguous():
        x = x.reshape(-1, 2 * half_in).contiguous()
    out = torch.empty(x.shape[0], num_panels // 2 * PANEL, dtype=torch.bfloat16)
    if x.shape[0]:
        _dot_gemm_silu(x.view(torch.int16).numpy(), flat(pairs) if pairs_data is None else pairs_data,
                       out.view(torch.int16).numpy(), numba_threads())
    return out


def flat(pairs: torch.Tensor) -> np.ndarray:
    """The packed weight's memory as the kernel takes it: int16 bits, flat."""
    return pairs.view(-1).view(torch.int16).numpy()


def warm_up() -> None:
    """Compile the kernel for both output dtypes now (or load it from numba's disk cache)."""
    w = pack_pairs(torch.ones(PANEL, 4, dtype=torch.bfloat16))
    for rows in (1, 3):
        for dtype in (torch.bfloat16, torch.float32):
            dot_gemm(torch.ones(rows, 4, dtype=torch.bfloat16), w, out_dtype=dtype)
        dot_silu(torch.ones(rows, 4, dtype=torch.bfloat16),
                 pack_pairs(torch.ones(2 * PANEL, 4, dtype=torch.bfloat16)))
