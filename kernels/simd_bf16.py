"""bf16 pairs inside numba kernels: what kernels/dot_bf16.py's GEMM needs of AVX512-BF16's
dot-product instruction (vdpbf16ps), beside kernels/simd.py's fp32 vectors (whose 16-lane
float32x16 holds its results).

numba has no bf16 type, so a pair travels as one int32 (its two int16 bits), sixteen pairs as
one `<16 x i32>`, bitcast to `<32 x bfloat>` for the call. LLVM emits the instruction only for a
CPU that has it: dot_pairs is compiled only where kernels.backend.dot_bf16_linear() says so.
round8 and store_rounded8 are plain integer vector ops, which the bf16 rotary (kernels/rotary.py)
compiles on every CPU.

A 16-lane result is split into two kernels.simd vectors (low8, high8) for what follows the
products (bias, rounding, silu), which runs once per output block.

numba's on-disk cache (`cache=True` kernels) checks only the source file of the function it
caches, not this one: after editing an intrinsic here, delete kernels/__pycache__.
"""
from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from kernels.simd import (WIDE, WIDTH, _VEC, _VEC16, _element_pointer, _is_f32_vector,
                          _is_i16_vector, float32x8, float32x16)


class _BFloat(ir.Type):
    """LLVM's bfloat type, which llvmlite's IR builder does not offer (it only names it)."""

    def _to_string(self) -> str:
        return "bfloat"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BFloat)

    def __hash__(self) -> int:
        return hash(_BFloat)


_I32x8 = ir.VectorType(ir.IntType(32), WIDTH)
_I32x16 = ir.VectorType(ir.IntType(32), WIDE)
_BF16x32 = ir.VectorType(_BFloat(), 2 * WIDE)


class Bf16Pairs(types.Type):
    def __init__(self) -> None:
        super().__init__(name="bf16x16x2")


bf16_pairs = Bf16Pairs()


@register_model(Bf16Pairs)
class _Bf16PairsModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, _I32x16)


@intrinsic
def load_pairs(typingctx: Any, arr: Any, index: Any) -> Any:
    """arr[index:index + 32] of an int16 (bf16 bits) array, as sixteen pairs (unaligned)."""
    if not _is_i16_vector(arr):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(ptr, _I32x16.as_pointer()), align=2)
    return bf16_pairs(arr, index), codegen


@intrinsic
def splat_pair(typingctx: Any, arr: Any, index: Any) -> Any:
    """The pair arr[index], arr[index + 1] (bf16 bits) in all sixteen pair slots."""
    if not _is_i16_vector(arr):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        pair = builder.load(builder.bitcast(ptr, ir.IntType(32).as_pointer()), align=2)
        lane0 = builder.insert_element(ir.Constant(_I32x16, ir.Undefined), pair,
                                       ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(lane0, lane0, ir.Constant(_I32x16, [0] * WIDE))
    return bf16_pairs(arr, index), codegen


@intrinsic
def dot_pairs(typingctx: Any, acc: Any, a: Any, b: Any) -> Any:
    """acc + per lane i: a[2i] * b[2i] + a[2i + 1] * b[2i + 1] (vdpbf16ps: the products exact
    in fp32, summed in fp32; bf16 denormals read as zero)."""
    if not (acc == float32x16 and a == b == bf16_pairs):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC16, [_VEC16, _BF16x32, _BF16x32]),
            "llvm.x86.avx512bf16.dpbf16ps.512")
        return builder.call(fn, [args[0], builder.bitcast(args[1], _BF16x32),
                                 builder.bitcast(args[2], _BF16x32)])
    return float32x16(acc, a, b), codegen


def _half(first: int) -> Any:
    """An intrinsic: lanes first .. first + 7 of a float32x16, as a float32x8."""
    def typer(typingctx: Any, v: Any) -> Any:
        if v != float32x16:
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            lanes = ir.Constant(_I32x8, list(range(first, first + WIDTH)))
            return builder.shuffle_vector(args[0], args[0], lanes)
        return float32x8(v), codegen
    return intrinsic(typer)


low8, high8 = _half(0), _half(WIDTH)


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
