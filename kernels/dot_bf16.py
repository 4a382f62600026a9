"""bf16 layers' decode-sized products on the dot-product instruction of AVX512-BF16.

vdpbf16ps adds to each of eight fp32 lanes the two products of a pair of bf16 values: sixteen
multiply-adds per instruction where an fp32 FMA does eight, at the same rate on Zen 4 (about 7
G instructions/s per core, either). oneDNN's bf16 product uses it too, but on a SmolLM2 body's
four layer shapes, weights read from memory as in a decode step, our kernel below took
0.63-0.86x of oneDNN's time at 1-8 rows and about the same from 16 rows (0.86-1.05x from run to
run), and at 1-2 rows about as long as the fp32 panel GEMM on bf16 panels (kernels/linear.py),
which reads the same bytes (kernels_bench --only body; docs/BENCHMARKS.md). So where the CPU has the instruction, a bf16 layer's panels are kept in the
pair layout below, and its products below the bf16 crossover (kernels.linear.calibrate) run
here instead of widening to fp32. The arithmetic is the same: a product of two bf16 values is
exact in fp32 and the sums are fp32, so only their order differs (and bf16 denormals, which the
instruction reads as zero).

Layout: panel p of 24 output columns holds, for each pair of input features (2k, 2k + 1), 48
bf16 values: column c's pair at [2c, 2c + 1], so one 256-bit load is the pairs of eight columns.
The microkernel computes 8 rows x 24 columns in 24 accumulators (AVX-512VL has 32 vector
registers: 24 + 3 weights + 1 broadcast pair), over the whole input (the panel, at most a few
hundred KiB, stays in L2 across the row blocks), and writes the output in bf16, rounded once, or
in fp32. A product of one or two rows takes a 2-row microkernel, which does not compute 8.
Kernel shapes tried here (Zen 4): 4 x 24, 4 x 48, 6 x 32, 8 x 24, input in chunks of 64-288
pairs or whole; 8 x 24 whole was fastest or tied at 1, 8 and 32 rows. Prefetching the next
panel (one or two ahead) while the first row block is computed made no difference that the
run-to-run noise here did not swamp, so it is not done. On one cached layer the kernel ran at
355-380 GFLOP/s at 32 rows, about 85% of the instruction's rate on these 2 cores; on the
whole body read from memory, at about 0.9-1.05x oneDNN's time from 16 rows up.

The intrinsics: numba has no bf16 type, so a pair travels as one int32 (its two int16 bits),
eight pairs as one `<8 x i32>`, bitcast to `<16 x bfloat>` for the call. LLVM emits the
instruction only for a CPU that has it: nothing here is compiled unless
kernels.backend.dot_bf16_linear() says so.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from kernels.backend import numba_threads
from kernels.simd import (WIDTH, _VEC, _element_pointer, _is_f32_vector, add8, broadcast8, div8,
                          exp8, float32x8, load8, mul8, store8, sub8, zeros8)

PANEL = 24      # output columns per panel, as kernels.linear's


class _BFloat(ir.Type):
    """LLVM's bfloat type, which llvmlite's IR builder does not offer (it only names it)."""

    def _to_string(self) -> str:
        return "bfloat"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BFloat)

    def __hash__(self) -> int:
        return hash(_BFloat)


_I32x8 = ir.VectorType(ir.IntType(32), WIDTH)
_BF16x16 = ir.VectorType(_BFloat(), 2 * WIDTH)


class Bf16Pairs(types.Type):
    def __init__(self) -> None:
        super().__init__(name="bf16x8x2")


bf16_pairs = Bf16Pairs()


@register_model(Bf16Pairs)
class _Bf16PairsModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, _I32x8)


def _is_i16_vector(arr: Any) -> bool:
    return (isinstance(arr, types.Array) and arr.dtype == types.int16 and arr.ndim == 1
            and arr.layout == "C")


@intrinsic
def load_pairs(typingctx: Any, arr: Any, index: Any) -> Any:
    """arr[index:index + 16] of an int16 (bf16 bits) array, as eight pairs (unaligned)."""
    if not _is_i16_vector(arr):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(ptr, _I32x8.as_pointer()), align=2)
    return bf16_pairs(arr, index), codegen


@intrinsic
def splat_pair(typingctx: Any, arr: Any, index: Any) -> Any:
    """The pair arr[index], arr[index + 1] (bf16 bits) in all eight pair slots."""
    if not _is_i16_vector(arr):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        pair = builder.load(builder.bitcast(ptr, ir.IntType(32).as_pointer()), align=2)
        lane0 = builder.insert_element(ir.Constant(_I32x8, ir.Undefined), pair,
                                       ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(lane0, lane0, ir.Constant(_I32x8, [0] * WIDTH))
    return bf16_pairs(arr, index), codegen


@intrinsic
def dot_pairs(typingctx: Any, acc: Any, a: Any, b: Any) -> Any:
    """acc + per lane i: a[2i] * b[2i] + a[2i + 1] * b[2i + 1] (vdpbf16ps: the products exact
    in fp32, summed in fp32; bf16 denormals read as zero)."""
    if not (acc == float32x8 and a == b == bf16_pairs):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC, _BF16x16, _BF16x16]),
            "llvm.x86.avx512bf16.dpbf16ps.256")
        return builder.call(fn, [args[0], builder.bitcast(args[1], _BF16x16),
                                 builder.bitcast(args[2], _BF16x16)])
    return float32x8(acc, a, b), codegen


@intrinsic
def store_rounded8(typingctx: Any, arr: Any, index: Any, value: Any) -> Any:
    """arr[index:index + 8] = value for a float32 array; for an int16 (bf16 bits) array, value
    rounded to bf16 first, to nearest even, NaN as torch's quiet NaN (kernels/bf16_bits.py
    rounds the same way, one value at a time)."""
    if value != float32x8 or not (_is_f32_vector(arr) or _is_i16_vector(arr)):
        return None
    bf16 = _is_i16_vector(arr)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        if not bf16:
            builder.store(args[2], builder.bitcast(ptr, _VEC.as_pointer()), align=4)
            return context.get_dummy_value()
        i16x8 = ir.VectorType(ir.IntType(16), WIDTH)
        builder.store(builder.trunc(_bf16_bits(builder, args[2]), i16x8),
                      builder.bitcast(ptr, i16x8.as_pointer()), align=2)
        return context.get_dummy_value()
    return types.void(arr, index, value), codegen


def _bf16_bits(builder: Any, value: Any) -> Any:
    """float32x8 -> <8 x i32> holding each lane's nearest bf16 (ties to even) in its low half."""
    def const(v: int) -> Any:
        return ir.Constant(_I32x8, [v] * WIDTH)
    bits = builder.bitcast(value, _I32x8)
    nan = builder.icmp_unsigned(">", builder.and_(bits, const(0x7FFFFFFF)), const(0x7F800000))
    odd = builder.and_(builder.lshr(bits, const(16)), const(1))
    rounded = builder.lshr(builder.add(builder.add(bits, const(0x7FFF)), odd), const(16))
    return builder.select(nan, const(0x7FC0), rounded)


@intrinsic
def round8(typingctx: Any, value: Any) -> Any:
    """Each lane rounded to bf16 as store_rounded8 rounds it, kept as an fp32 value."""
    if value != float32x8:
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        bits = builder.shl(_bf16_bits(builder, args[0]), ir.Constant(_I32x8, [16] * WIDTH))
        return builder.bitcast(bits, _VEC)
    return float32x8(value), codegen


# --- the GEMM ---------------------------------------------------------------------------------

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
def _store(out, bias, r, n0, a, b, c, mode, gate, rl):  # type: ignore[no-untyped-def]
    """Row r's 24 sums at column n0 of out (mode 0); mode 1 (a gate panel): their bf16 values
    to gate[rl], the block's scratch; mode 2 (the up panel after it): silu(gate) * up."""
    if mode == 1:
        g = gate[rl]
        store8(g, 0, round8(a))
        store8(g, 8, round8(b))
        store8(g, 16, round8(c))
        return
    if mode == 2:
        g = gate[rl]
        a, b, c = _silu_times(load8(g, 0), a), _silu_times(load8(g, 8), b), _silu_times(load8(g, 16), c)
    row = out[r]
    if bias.shape[0]:
        a, b, c = add8(a, load8(bias, n0)), add8(b, load8(bias, n0 + 8)), add8(c, load8(bias, n0 + 16))
    store_rounded8(row, n0, a)
    store_rounded8(row, n0 + 8, b)
    store_rounded8(row, n0 + 16, c)


@njit(nogil=True, boundscheck=False, cache=True)
def _rows8(x, m0, rows, wp, base, pairs, out, n0, bias, mode, gate):  # type: ignore[no-untyped-def]
    """out[m0 : m0 + rows, n0 : n0 + 24] = x[m0 : m0 + rows] @ the panel at wp[base:] (+ bias);
    rows <= 8. Missing rows repeat row m0: computed, never stored. mode, gate: _store's."""
    c00 = zeros8(); c01 = zeros8(); c02 = zeros8(); c10 = zeros8(); c11 = zeros8(); c12 = zeros8()  # noqa: E702,E501
    c20 = zeros8(); c21 = zeros8(); c22 = zeros8(); c30 = zeros8(); c31 = zeros8(); c32 = zeros8()  # noqa: E702,E501
    c40 = zeros8(); c41 = zeros8(); c42 = zeros8(); c50 = zeros8(); c51 = zeros8(); c52 = zeros8()  # noqa: E702,E501
    c60 = zeros8(); c61 = zeros8(); c62 = zeros8(); c70 = zeros8(); c71 = zeros8(); c72 = zeros8()  # noqa: E702,E501
    x0, x1 = x[m0], x[m0 + min(1, rows - 1)]
    x2, x3 = x[m0 + min(2, rows - 1)], x[m0 + min(3, rows - 1)]
    x4, x5 = x[m0 + min(4, rows - 1)], x[m0 + min(5, rows - 1)]
    x6, x7 = x[m0 + min(6, rows - 1)], x[m0 + min(7, rows - 1)]
    for k in range(pairs):
        at, i = base + k * 2 * PANEL, 2 * k
        w0 = load_pairs(wp, at); w1 = load_pairs(wp, at + 16); w2 = load_pairs(wp, at + 32)  # noqa: E702
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
    c00 = zeros8(); c01 = zeros8(); c02 = zeros8(); c10 = zeros8(); c11 = zeros8(); c12 = zeros8()  # noqa: E702,E501
    x0, x1 = x[m0], x[m0 + min(1, rows - 1)]
    for k in range(pairs):
        at, i = base + k * 2 * PANEL, 2 * k
        w0 = load_pairs(wp, at); w1 = load_pairs(wp, at + 16); w2 = load_pairs(wp, at + 32)  # noqa: E702
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
