"""bfloat16 inside numba kernels, which have no bf16 type: values travel as their int16 bits.

A bf16 is the top half of an fp32, so widening is exact: the bits shifted up 16. Rounding an
fp32 to bf16 is round to nearest, ties to even, on the bits; NaN becomes torch's quiet NaN
(0x7FC0). These are the two conversions torch's CPU kernels make around every bf16 op (they
compute in fp32 and round the result), so a numba kernel that rounds where torch's ops round
gets torch's bits (kernels/rmsnorm.py and kernels/rotary.py check it against the reference).

Kernels work on fp32 scratch rows that they also view as uint32 (`scratch.view(np.uint32)`), so
rounding a whole row is an integer loop that LLVM vectorizes. numba's on-disk cache checks only
the file of the function it caches: after editing this one, delete kernels/__pycache__.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, boundscheck=False, inline="always")
def _rounded(bits):  # type: ignore[no-untyped-def]
    """fp32 bits -> the bits of the nearest bf16 (ties to even), as an fp32 (low half zero)."""
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return np.uint32(0x7FC00000)
    return np.uint32((np.int64(bits) + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000)


@njit(nogil=True, boundscheck=False, inline="always")
def widen(src, dst):  # type: ignore[no-untyped-def]
    """src: int16 bf16 bits; dst: uint32 view of an fp32 row; exact."""
    for i in range(src.shape[0]):
        dst[i] = np.uint32(np.uint16(src[i])) << 16


@njit(nogil=True, boundscheck=False, inline="always")
def round_in_place(bits):  # type: ignore[no-untyped-def]
    """bits: uint32 view of an fp32 row; each value becomes its bf16 rounding (still fp32)."""
    for i in range(bits.shape[0]):
        bits[i] = _rounded(bits[i])


@njit(nogil=True, boundscheck=False, inline="always")
def narrow(bits, dst):  # type: ignore[no-untyped-def]
    """bits: uint32 view of an fp32 row -> dst: int16 bf16 bits, rounded to nearest even."""
    for i in range(bits.shape[0]):
        dst[i] = np.int16(np.uint16(_rounded(bits[i]) >> 16))
