from __future__ import annotations

import numpy as np
from numba import njit

from kernels.simd import WIDTH, exp8, load8, store8


@njit(nogil=True, boundscheck=False, cache=True)
def _exp_all(x, out):  # type: ignore[no-untyped-def]
    for i in range(0, x.shape[0], WIDTH):
        store8(out, i, exp8(load8(x, i)))


def test_exp8_is_within_an_ulp_and_a_quarter_and_keeps_the_specials() -> None:
    """exp8 (the attention kernel's softmax exp) against exp in float64, in ulps of the float32
    result, over the whole range where the result is a normal float; and exp(-inf) = 0,
    exp(nan) = nan, exp(0) = 1, overflow = inf, underflow = 0."""
    normal = np.linspace(-87.3, 88.7, 400_000, dtype=np.float32)
    specials = np.array([-np.inf, np.nan, 0.0, 89.0, np.inf, -88.0, -1000.0, 1000.0], np.float32)
    x = np.concatenate([normal, specials])
    out = np.empty_like(x)
    _exp_all(x, out)
    exact = np.exp(normal.astype(np.float64))
    ulps = np.abs(out[:normal.size] - exact) / np.spacing(exact.astype(np.float32))
    assert ulps.max() <= 1.25
    np.testing.assert_array_equal(out[normal.size:], [0.0, np.nan, 1.0, np.inf, np.inf, 0.0, 0.0, np.inf])
