"""Eight- and sixteen-float vectors inside numba kernels: value types and the few operations a
GEMM and a softmax need.

numba vectorizes simple loops on its own, but it cannot keep a block of accumulators in
registers across a loop: its arrays live in memory, and a matrix product written with them
loads and stores every partial sum (or sums each output with a horizontal reduction). These
intrinsics hand LLVM `<8 x float>` values directly, so a kernel can hold twelve accumulators in
twelve AVX registers, the way a BLAS microkernel does (kernels/linear.py).

`<8 x float>` is one AVX register. On a CPU without AVX, LLVM splits it into two SSE halves:
slower, still correct. `<16 x float>` (load16, fma16, ...) is one AVX-512 register where LLVM
uses those (kernels.backend.wide_registers), and two AVX halves elsewhere: a kernel blocked for
sixteen lanes then needs twice the registers it was written for, so it chooses its width by that.

Also here: `as_f32`, which reads bfloat16 values (numba has no type for them) from int16 bits.

numba's on-disk cache (`cache=True` kernels, kernels/__pycache__) checks only the source file of
the function it caches, not this one: after editing an intrinsic here, delete the cache files.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

WIDTH = 8
WIDE = 2 * WIDTH    # fp32 lanes of one 512-bit register
_VEC = ir.VectorType(ir.FloatType(), WIDTH)
_VEC16 = ir.VectorType(ir.FloatType(), WIDE)


class Float32x8(types.Type):
    def __init__(self) -> None:
        super().__init__(name="float32x8")


class Float32x16(types.Type):
    def __init__(self) -> None:
        super().__init__(name="float32x16")


float32x8 = Float32x8()
float32x16 = Float32x16()


class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, _VEC if fe_type == float32x8 else _VEC16)


register_model(Float32x8)(_VectorModel)
register_model(Float32x16)(_VectorModel)


# lanes -> (numba type, LLVM type): the ops below come in both widths (load8 and load16, ...)
_VECTORS = {WIDTH: (float32x8, _VEC), WIDE: (float32x16, _VEC16)}


def _element_pointer(context: Any, builder: Any, arrty: Any, arr: Any, index: Any) -> Any:
    # No wraparound: an index is never negative here, and numba's check for it (a compare and
    # an add on every access whose index it cannot prove non-negative) halved the GEMM's speed.
    array = context.make_array(arrty)(context, builder, arr)
    return cgutils.get_item_pointer(context, builder, arrty, array, [index], wraparound=False)


def _is_f32_vector(arr: Any) -> bool:
    return (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1
            and arr.layout == "C")


def _is_i16_vector(arr: Any) -> bool:
    """A contiguous 1-d int16 array: bf16 values as their bits."""
    return (isinstance(arr, types.Array) and arr.dtype == types.int16 and arr.ndim == 1
            and arr.layout == "C")


def _load(width: int) -> Any:
    """load8 / load16: arr[index:index + width] of a contiguous 1-d float32 array, as one vector
    (unaligned). An int16 array holds bfloat16 bits: they are widened exactly (a shift into the
    top half), so a kernel reading bf16 weights moves half the bytes of fp32 and computes the
    same."""
    vtype, vec = _VECTORS[width]

    def typer(typingctx: Any, arr: Any, index: Any) -> Any:
        bf16 = _is_i16_vector(arr)
        if not (_is_f32_vector(arr) or bf16):
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
            if not bf16:
                return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4)
            i16s, i32s = ir.VectorType(ir.IntType(16), width), ir.VectorType(ir.IntType(32), width)
            bits = builder.zext(builder.load(builder.bitcast(ptr, i16s.as_pointer()), align=2), i32s)
            return builder.bitcast(builder.shl(bits, ir.Constant(i32s, [16] * width)), vec)
        return vtype(arr, index), codegen
    return intrinsic(typer)


def _store(width: int) -> Any:
    """store8 / store16: arr[index:index + width] = value, for a contiguous 1-d float32 array."""
    vtype, vec = _VECTORS[width]

    def typer(typingctx: Any, arr: Any, index: Any, value: Any) -> Any:
        if not (_is_f32_vector(arr) and value == vtype):
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
            builder.store(args[2], builder.bitcast(ptr, vec.as_pointer()), align=4)
            return context.get_dummy_value()
        return types.void(arr, index, value), codegen
    return intrinsic(typer)


def _splat_load(width: int) -> Any:
    """splat8 / splat16: a vector with arr[index] in every lane (one broadcast load)."""
    vtype, vec = _VECTORS[width]

    def typer(typingctx: Any, arr: Any, index: Any) -> Any:
        if not _is_f32_vector(arr):
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            x = builder.load(_element_pointer(context, builder, sig.args[0], args[0], args[1]))
            return _splat(builder, x, vec)
        return vtype(arr, index), codegen
    return intrinsic(typer)


def _splat(builder: Any, x: Any, vec: Any = _VEC) -> Any:
    lanes = vec.count
    lane0 = builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(lane0, lane0,
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _zeros(width: int) -> Any:
    vtype, vec = _VECTORS[width]

    def typer(typingctx: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return ir.Constant(vec, [0.0] * width)
        return vtype(), codegen
    return intrinsic(typer)


def _fma(width: int) -> Any:
    """fma8 / fma16: a * b + c lane by lane: one FMA instruction where the CPU has FMA (then
    rounded once), a multiply and an add where it has not (llvm.fmuladd, never a slow software
    fma)."""
    vtype, vec = _VECTORS[width]

    def typer(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
        if not a == b == c == vtype:
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                                f"llvm.fmuladd.v{width}f32")
            return builder.call(fn, args)
        return vtype(a, b, c), codegen
    return intrinsic(typer)


def _lanewise(op: Any, width: int = WIDTH) -> Any:
    """An intrinsic (a, b) -> op(builder, a, b) on two vectors of `width` lanes."""
    vtype = _VECTORS[width][0]

    def typer(typingctx: Any, a: Any, b: Any) -> Any:
        if not a == b == vtype:
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return op(builder, args[0], args[1])
        return vtype(a, b), codegen
    return intrinsic(typer)


def _broadcast(width: int) -> Any:
    """broadcast8 / broadcast16: a vector with the float32 x in every lane."""
    vtype, vec = _VECTORS[width]

    def typer(typingctx: Any, x: Any) -> Any:
        if x != types.float32:
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return _splat(builder, args[0], vec)
        return vtype(x), codegen
    return intrinsic(typer)


load8, load16 = _load(WIDTH), _load(WIDE)
store8, store16 = _store(WIDTH), _store(WIDE)
splat8, splat16 = _splat_load(WIDTH), _splat_load(WIDE)
zeros8, zeros16 = _zeros(WIDTH), _zeros(WIDE)
fma8, fma16 = _fma(WIDTH), _fma(WIDE)
broadcast8, broadcast16 = _broadcast(WIDTH), _broadcast(WIDE)
add8, add16 = (_lanewise(lambda b, x, y: b.fadd(x, y), w) for w in (WIDTH, WIDE))
sub8, sub16 = (_lanewise(lambda b, x, y: b.fsub(x, y), w) for w in (WIDTH, WIDE))
mul8, mul16 = (_lanewise(lambda b, x, y: b.fmul(x, y), w) for w in (WIDTH, WIDE))
div8 = _lanewise(lambda b, x, y: b.fdiv(x, y))
# y where y > x, else x: a NaN in y is passed over, as Python's max(x, y) does.
max8, max16 = (_lanewise(lambda b, x, y: b.select(b.fcmp_ordered(">", y, x), y, x), w)
               for w in (WIDTH, WIDE))


@intrinsic
def lane8(typingctx: Any, v: Any, i: Any) -> Any:
    """Lane i of v, as a float32."""
    if v != float32x8 or not isinstance(i, types.Integer):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.extract_element(args[0], args[1])
    return types.float32(v, i), codegen


@intrinsic
def sum8(typingctx: Any, v: Any) -> Any:
    """The sum of v's lanes, as a float32, in a fixed order on every CPU: the two halves added
    lane by lane, then those four lanes' halves, then the last two (LLVM makes it shuffles and
    adds, where a scalar loop over lane8 would be eight extracts)."""
    if v != float32x8:
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        i32 = ir.IntType(32)

        def lanes(x: Any, idx: list[int]) -> Any:
            return builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(i32, len(idx)), idx))

        four = builder.fadd(lanes(args[0], [0, 1, 2, 3]), lanes(args[0], [4, 5, 6, 7]))
        two = builder.fadd(lanes(four, [0, 1]), lanes(four, [2, 3]))
        return builder.fadd(builder.extract_element(two, ir.Constant(i32, 0)),
                            builder.extract_element(two, ir.Constant(i32, 1)))
    return types.float32(v), codegen


# exp8 / exp16: Cephes' expf, eight or sixteen lanes at once. x = n ln2 + r with |r| <= ln2 / 2
# (ln2 split in two so n ln2 is exact), exp(r) by a degree-7 polynomial, times 2^n built in the
# exponent bits.
# Within ~1 ulp of the correctly rounded value; below -87.33 the result is 0 (exp(-inf) = 0),
# above 88.72 it is inf, and NaN stays NaN (comparisons with NaN are false, so the selects keep
# it). It replaces libm's scalar expf, one call per value, in the attention softmax.
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)


def _exp(width: int) -> Any:
    vtype, vec = _VECTORS[width]

    def typer(typingctx: Any, x: Any) -> Any:
        if x != vtype:
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            def const(v: float) -> Any:
                return ir.Constant(vec, [v] * width)
            module = builder.module
            fma = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec] * 3),
                                                 f"llvm.fmuladd.v{width}f32")
            rint = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec]),
                                                  f"llvm.rint.v{width}f32")
            x = args[0]
            lo, hi = const(-87.33), const(88.72)
            xc = builder.select(builder.fcmp_ordered("<", x, lo), lo, x)
            xc = builder.select(builder.fcmp_ordered(">", xc, hi), hi, xc)
            n = builder.call(rint, [builder.fmul(xc, const(1.44269504088896341))])
            r = builder.fsub(xc, builder.fmul(n, const(0.693359375)))
            r = builder.fsub(r, builder.fmul(n, const(-2.12194440e-4)))
            p = const(_EXP_POLY[0])
            for c in _EXP_POLY[1:]:
                p = builder.call(fma, [p, r, const(c)])
            r2 = builder.fmul(r, r)
            y = builder.call(fma, [p, r2, builder.fadd(r, const(1.0))])
            # 2^n as two factors 2^(n >> 1) * 2^(n - (n >> 1)): each stays a normal float for
            # every n in [-126, 128], where 2^n alone would not at n = 128.
            i32 = ir.VectorType(ir.IntType(32), width)
            ni = builder.fptosi(n, i32)
            half = builder.ashr(ni, ir.Constant(i32, [1] * width))
            for part in (half, builder.sub(ni, half)):
                bits = builder.shl(builder.add(part, ir.Constant(i32, [127] * width)),
                                   ir.Constant(i32, [23] * width))
                y = builder.fmul(y, builder.bitcast(bits, vec))
            y = builder.select(builder.fcmp_ordered("<", x, lo), const(0.0), y)
            return builder.select(builder.fcmp_ordered(">", x, hi), const(float("inf")), y)
        return vtype(x), codegen
    return intrinsic(typer)


exp8, exp16 = _exp(WIDTH), _exp(WIDE)     # each lane's result the same in both widths


@intrinsic
def bf16_to_f32(typingctx: Any, bits: Any) -> Any:
    """The float32 value of the bfloat16 whose bits are `bits` (int16): exact."""
    if bits != types.int16:
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(bits), codegen


def as_f32(x):  # type: ignore[no-untyped-def]  # numba matches overloads by exact signature
    """x as float32 inside a numba kernel: a float32 as it is, int16 bits as the bfloat16 they
    hold (so one kernel source compiles for fp32 and for bf16 caches)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(as_f32, inline="always")
def _as_f32(x):  # type: ignore[no-untyped-def]  # annotations would differ from the lambdas'

    if x == types.float32:
        return lambda x: x
    if x == types.int16:
        return lambda x: bf16_to_f32(x)
    return None


@intrinsic
def prefetch(typingctx: Any, arr: Any, index: Any) -> Any:
    """Ask the CPU to bring the cache line holding element `index` of a C-contiguous array (of
    any rank, counted flat) into its caches, without waiting for it: a kernel that walks memory
    in an order the hardware prefetcher cannot guess (paged KV blocks through a block table)
    names the next block while it computes on this one."""
    if not (isinstance(arr, types.Array) and arr.layout == "C" and isinstance(index, types.Integer)):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        array = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(array.data, [args[1]])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
        # read (0), keep in every cache level (3), data (1)
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(arr, index), codegen


# --- row helpers: a softmax's max and sum of exps (attention and sampler kernels) -----------

@njit(nogil=True, boundscheck=False, inline="always")
def row_max(row):  # type: ignore[no-untyped-def]
    """max(row) of a 1-d float32 row of at least one value: eight lanes, then the lanes and
    the tail in order (NaN is passed over, as max8 does)."""
    n = row.shape[0]
    m = row[0]
    p = 0
    if n >= WIDTH:
        mv = load8(row, 0)
        while p + WIDTH <= n:
            mv = max8(mv, load8(row, p))
            p += WIDTH
        for lane in range(WIDTH):
            m = max(m, lane8(mv, lane))
    for i in range(p, n):
        m = max(m, row[i])
    return m


@njit(nogil=True, boundscheck=False, inline="always")
def exp_sum(row, shift, out):  # type: ignore[no-untyped-def]
    """out = exp(row - shift), returning their sum: eight lanes in order, then lane by lane,
    then the tail in order. Every value goes through exp8, vector or tail alike."""
    n = row.shape[0]
    sv = broadcast8(shift)
    sums = zeros8()
    p = 0
    while p + WIDTH <= n:
        e = exp8(sub8(load8(row, p), sv))
        store8(out, p, e)
        sums = add8(sums, e)
        p += WIDTH
    total = np.float32(0.0)
    for lane in range(WIDTH):
        total += lane8(sums, lane)
    for i in range(p, n):
        e = lane8(exp8(broadcast8(row[i] - shift)), 0)
        out[i] = e
        total += e
    return total
