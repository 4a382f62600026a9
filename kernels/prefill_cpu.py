"""The fast CPU prefill attention: every prefill of a step in one numba call, reading the paged
cache in place through the block tables (as kernels.decode_cpu does for decodes).

Before, each prefill went to torch's SDPA over its own gathered keys: one call per prompt and
layer, ~0.26 ms for a 100-token prompt, most of it the call rather than the arithmetic (~11
MFLOP). Here a step's prompts are cut into tiles of TILE_ROWS query rows; each (tile, kv head)
is a work item, split across the threads. An item walks its keys in spans of SPAN with an online
softmax (flash attention's order: a span's scores, the running max and sum, the weighted sum of
values rescaled whenever the max grows), fp32 throughout, causal: query row i of a prompt of n
new tokens over seq_len keys sees keys 0 ..= seq_len - n + i.

The products are kernels.simd's vectors held in registers:
- scores: the span's keys widened once into kw [SPAN, head_dim], the tile's query vectors
  transposed into qt [head_dim, query vectors], so eight keys' scores against LANES query
  vectors are eight accumulators over head_dim FMAs, with no horizontal sums;
- values: the span's values widened once into vw [SPAN, head_dim]; two query vectors' weighted
  sums over four vectors of LANES dims are eight accumulators over the span's keys. The earlier
  spans' sums are rescaled by the online softmax's alpha as they are loaded (a pass of their
  own over the accumulated values took a sixth of the kernel's time).
LANES is 16 where numba's target holds sixteen floats in one register (AVX-512), else 8. Each
lane's sums are the same either way, so are the bits; sixteen lanes took 0.63-0.75x the time
of eight on Zen 5 (docs/BENCHMARKS.md, Kernels: prefill attention).

Needs head_dim % 8 == 0 (can_prefill_in_place); anything else keeps SDPA (kernels.attention).
fastmath is limited to reassociation and contraction, as in decode_cpu: NaN and inf propagate.
The deterministic mode does not come here: its prefill rows go through the decode kernel one by
one (kernels.invariant), for bits that do not depend on the batch.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from kernels.backend import numba_threads, wide_registers
from kernels.decode_cpu import can_attend_in_place, kernel_views
from kernels.simd import (WIDE, WIDTH, add8, add16, broadcast8, broadcast16, exp8, exp16, fma8,
                          fma16, load8, load16, max8, max16, mul8, mul16, splat8, splat16, store8,
                          store16, sub8, sub16, zeros8, zeros16)

_FASTMATH = {"reassoc", "contract", "arcp"}     # not nnan / ninf: NaN and inf must propagate

TILE_ROWS = 16      # query rows per item: 48 query vectors for SmolLM2's 3 heads per kv head
SPAN = 64           # keys per span (a multiple of 8: the score blocks' keys)

# The vectors of the products and the softmax: sixteen lanes where they fill one register,
# eight elsewhere (sixteen-lane blocks split in halves would need 16 accumulators in 16 AVX
# registers).
# numba's on-disk cache keys a kernel on the target CPU, which decides this too.
LANES = WIDE if wide_registers() else WIDTH
(loadv, storev, splatv, fmav, mulv, broadcastv, zerosv, addv, subv, maxv, expv) = (
    (load16, store16, splat16, fma16, mul16, broadcast16, zeros16, add16, sub16, max16, exp16)
    if LANES == WIDE else
    (load8, store8, splat8, fma8, mul8, broadcast8, zeros8, add8, sub8, max8, exp8))


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, cache=True)
def _load_span(k_cache, v_cache, table, h, k0, nk, kw, vw):  # type: ignore[no-untyped-def]
    """Keys and values k0 .. k0 + nk - 1 of kv head h, widened to fp32 eight at a time
    (load8 widens bf16 bits exactly): kw[j * d + x] is key j's dim x, vw the same for values."""
    bs, d = k_cache.shape[1], k_cache.shape[3]
    for j in range(nk):
        blk = table[(k0 + j) // bs]
        o = (k0 + j) % bs
        krow, vrow = k_cache[blk, o, h], v_cache[blk, o, h]
        for x in range(0, d, 8):
            store8(kw, j * d + x, load8(krow, x))
            store8(vw, j * d + x, load8(vrow, x))


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, cache=True)
def _scores(qt, kw, nqp, nk, d, scale, s):  # type: ignore[no-untyped-def]
    """s[j * nqp + v] = scale * (key j . query vector v): eight keys by LANES query vectors, the
    query vectors across the lanes (qt[x * nqp + v] is vector v's dim x)."""
    sc = broadcastv(scale)
    for j in range(0, nk, 8):
        k0, k1, k2, k3 = j * d, (j + 1) * d, (j + 2) * d, (j + 3) * d
        k4, k5, k6, k7 = (j + 4) * d, (j + 5) * d, (j + 6) * d, (j + 7) * d
        for v in range(0, nqp, LANES):
            s0, s1, s2, s3 = zerosv(), zerosv(), zerosv(), zerosv()
            s4, s5, s6, s7 = zerosv(), zerosv(), zerosv(), zerosv()
            for x in range(d):
                q = loadv(qt, x * nqp + v)
                s0, s1 = fmav(splatv(kw, k0 + x), q, s0), fmav(splatv(kw, k1 + x), q, s1)
                s2, s3 = fmav(splatv(kw, k2 + x), q, s2), fmav(splatv(kw, k3 + x), q, s3)
                s4, s5 = fmav(splatv(kw, k4 + x), q, s4), fmav(splatv(kw, k5 + x), q, s5)
                s6, s7 = fmav(splatv(kw, k6 + x), q, s6), fmav(splatv(kw, k7 + x), q, s7)
            base = j * nqp + v
            storev(s, base, mulv(s0, sc))
            storev(s, base + nqp, mulv(s1, sc))
            storev(s, base + 2 * nqp, mulv(s2, sc))
            storev(s, base + 3 * nqp, mulv(s3, sc))
            storev(s, base + 4 * nqp, mulv(s4, sc))
            storev(s, base + 5 * nqp, mulv(s5, sc))
            storev(s, base + 6 * nqp, mulv(s6, sc))
            storev(s, base + 7 * nqp, mulv(s7, sc))


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, cache=True)
def _softmax_span(s, nqp, nk, m, total, alpha):  # type: ignore[no-untyped-def]
    """The online softmax's step over one span, LANES query vectors at a time (a lane each):
    the running max m grows to the span's, alpha = exp(old max - new max) rescales the earlier
    sum (and, in _weigh_values, the weighted values), s becomes exp(score - max) (0 where -inf)."""
    for v in range(0, nqp, LANES):
        old = loadv(m, v)
        mx = old
        for j in range(nk):
            mx = maxv(mx, loadv(s, j * nqp + v))
        sums = zerosv()
        for j in range(nk):
            e = expv(subv(loadv(s, j * nqp + v), mx))
            storev(s, j * nqp + v, e)
            sums = addv(sums, e)
        a = expv(subv(old, mx))              # 0 on the first span (old = -inf)
        storev(alpha, v, a)
        storev(total, v, fmav(loadv(total, v), a, sums))
        storev(m, v, mx)


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, cache=True)
def _weigh_values(s, vw, nqp, nk, d, alpha, acc):  # type: ignore[no-untyped-def]
    """acc[v * d + x] = alpha[v] * acc[v * d + x] + the sum over the span's keys j of
    s[j * nqp + v] * vw[j * d + x]: the earlier spans' sum rescaled as it is loaded, then two
    query vectors by four vectors of LANES dims (by 8 for a head_dim's last d % (4 * LANES))."""
    step = 4 * LANES
    wide = d - d % step
    for a in range(0, nqp, 2):
        ca, cb = a * d, (a + 1) * d
        ra, rb = broadcastv(alpha[a]), broadcastv(alpha[a + 1])
        for c in range(0, wide, step):
            c1, c2, c3 = c + LANES, c + 2 * LANES, c + 3 * LANES
            a0, a1 = mulv(loadv(acc, ca + c), ra), mulv(loadv(acc, ca + c1), ra)
            a2, a3 = mulv(loadv(acc, ca + c2), ra), mulv(loadv(acc, ca + c3), ra)
            b0, b1 = mulv(loadv(acc, cb + c), rb), mulv(loadv(acc, cb + c1), rb)
            b2, b3 = mulv(loadv(acc, cb + c2), rb), mulv(loadv(acc, cb + c3), rb)
            for j in range(nk):
                row = j * d
                v0, v1 = loadv(vw, row + c), loadv(vw, row + c1)
                v2, v3 = loadv(vw, row + c2), loadv(vw, row + c3)
                p = splatv(s, j * nqp + a)
                a0, a1, a2, a3 = fmav(p, v0, a0), fmav(p, v1, a1), fmav(p, v2, a2), fmav(p, v3, a3)
                p = splatv(s, j * nqp + a + 1)
                b0, b1, b2, b3 = fmav(p, v0, b0), fmav(p, v1, b1), fmav(p, v2, b2), fmav(p, v3, b3)
            storev(acc, ca + c, a0)
            storev(acc, ca + c1, a1)
            storev(acc, ca + c2, a2)
            storev(acc, ca + c3, a3)
            storev(acc, cb + c, b0)
            storev(acc, cb + c1, b1)
            storev(acc, cb + c2, b2)
            storev(acc, cb + c3, b3)
        ra8, rb8 = broadcast8(alpha[a]), broadcast8(alpha[a + 1])
        for c in range(wide, d, 8):
            a0, b0 = mul8(load8(acc, ca + c), ra8), mul8(load8(acc, cb + c), rb8)
            for j in range(nk):
                v0 = load8(vw, j * d + c)
                a0 = fma8(splat8(s, j * nqp + a), v0, a0)
                b0 = fma8(splat8(s, j * nqp + a + 1), v0, b0)
            store8(acc, ca + c, a0)
            store8(acc, cb + c, b0)


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, cache=True)
def _tile(q, k_cache, v_cache, table, seq_len, n, q0, r0, r1, h, scale, out,
          qt, kw, vw, s, acc, m, total, alpha):  # type: ignore[no-untyped-def]
    """Rows r0 .. r1 - 1 of one prefill (its n new rows start at q0 in q [T, kvh, group, d]),
    kv head h -> out[q0 + r0 .. q0 + r1 - 1, h]. The arrays after out are the worker's scratch
    (_scratch), overwritten."""
    group, d = q.shape[2], q.shape[3]
    nq = (r1 - r0) * group                   # query vectors, v = row * group + head in group
    nqp = _padded(nq)                        # zero queries up to whole vectors
    for i in range(r1 - r0):
        for g in range(group):
            for x in range(d):
                qt[x * nqp + i * group + g] = q[q0 + r0 + i, h, g, x]
    for x in range(d):
        qt[x * nqp + nq:(x + 1) * nqp] = 0
    acc[:nqp * d] = 0
    m[:] = -np.inf
    total[:] = 0
    first = seq_len - n                       # position of the prefill's first new row
    for k0 in range(0, first + r1, SPAN):
        nk = min(SPAN, first + r1 - k0)
        _load_span(k_cache, v_cache, table, h, k0, nk, kw, vw)
        _scores(qt, kw, nqp, (nk + 7) // 8 * 8, d, scale, s)
        # Causal: row i (query vectors i * group ..) sees keys up to position first + r0 + i,
        # so key p is hidden from rows 0 .. p - first - r0 - 1 (only keys past the first row).
        for j in range(max(0, first + r0 + 1 - k0), nk):
            for v in range(min(k0 + j - first - r0, r1 - r0) * group):
                s[j * nqp + v] = -np.inf
        _softmax_span(s, nqp, nk, m, total, alpha)
        _weigh_values(s, vw, nqp, nk, d, alpha, acc)
    for i in range(r1 - r0):
        for g in range(group):
            v = i * group + g
            inv = np.float32(1.0) / total[v]
            for x in range(d):
                out[q0 + r0 + i, h, g, x] = acc[v * d + x] * inv


@njit(nogil=True, boundscheck=False, cache=True)
def _items(q_starts, num_kv_heads):  # type: ignore[no-untyped-def]
    """(prefill, first row, kv head) per item: each prefill's rows in tiles of TILE_ROWS. A
    prefill's later tiles see more keys; dealt round robin, every worker gets light and heavy
    tiles alike (in contiguous shares the last worker got three quarters of a long prompt)."""
    count = 0
    for p in range(q_starts.shape[0] - 1):
        count += (q_starts[p + 1] - q_starts[p] + TILE_ROWS - 1) // TILE_ROWS
    items = np.empty((count * num_kv_heads, 3), np.int64)
    i = 0
    for p in range(q_starts.shape[0] - 1):
        for r0 in range(0, q_starts[p + 1] - q_starts[p], TILE_ROWS):
            for h in range(num_kv_heads):
                items[i, 0], items[i, 1], items[i, 2] = p, r0, h
                i += 1
    return items


@njit(nogil=True, boundscheck=False, inline="always")
def _padded(nq):  # type: ignore[no-untyped-def]
    """nq query vectors rounded up to a multiple of WIDE: whole vectors at either LANES, so a
    tile's bits do not depend on the width."""
    return (nq + WIDE - 1) // WIDE * WIDE


@njit(nogil=True, boundscheck=False, cache=True)
def _scratch(group, d):  # type: ignore[no-untyped-def]
    """One worker's scratch for _tile, sized for a full tile: queries transposed qt, a span's
    keys kw and values vw, its scores s, the weighted values acc, the running max m, sum total
    and rescale alpha."""
    nqp = _padded(TILE_ROWS * group)
    # A short span's keys are padded to the score blocks' 8 with whatever kw holds: their
    # scores are computed and never read.
    return (np.empty(d * nqp, np.float32), np.empty(SPAN * d, np.float32),
            np.empty(SPAN * d, np.float32), np.empty(SPAN * nqp, np.float32),
            np.empty(nqp * d, np.float32), np.empty(nqp, np.float32), np.empty(nqp, np.float32),
            np.empty(nqp, np.float32))


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, parallel=True, cache=True)
def _prefill_parallel(q, k_cache, v_cache, tables, seq_lens, q_starts, scale, threads, out):  # type: ignore[no-untyped-def]
    items = _items(q_starts, q.shape[1])
    workers = max(1, min(threads, items.shape[0]))
    for w in prange(workers):               # one scratch per worker, items dealt round robin
        qt, kw, vw, s, acc, m, total, alpha = _scratch(q.shape[2], q.shape[3])
        for i in range(w, items.shape[0], workers):
            p, r0, h = items[i, 0], items[i, 1], items[i, 2]
            n = q_starts[p + 1] - q_starts[p]
            _tile(q, k_cache, v_cache, tables[p], seq_lens[p], n, q_starts[p], r0,
                  min(r0 + TILE_ROWS, n), h, scale, out, qt, kw, vw, s, acc, m, total, alpha)


def can_prefill_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the in-place prefill takes these: an fp32 or bf16 cache of q's dtype, on the CPU,
    contiguous, head_dim a multiple of 8 (the kernels' vectors)."""
    return can_attend_in_place(q, k_cache, v_cache) and q.shape[-1] % 8 == 0


def prefill_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     tables: np.ndarray, seq_lens: np.ndarray, q_starts: np.ndarray,
                     scale: float) -> torch.Tensor:
    """q [T, h, d] -> [T, h, d]: prefill p's rows q_starts[p] .. q_starts[p + 1] - 1 attend,
    causally, to the first seq_lens[p] keys of block table tables[p] (its new rows are the last
    ones of those keys), read in place. Arithmetic is fp32; a bf16 result is rounded once."""
    rows, num_heads, head_dim = q.shape
    qd, out, kc, vc = kernel_views(q, k_cache, v_cache)
    _prefill_parallel(qd.numpy(), kc, vc, tables, seq_lens, q_starts, np.float32(scale),
                      numba_threads(), out.numpy())
    out = out.view(rows, num_heads, head_dim)
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def warm_up() -> None:
    """Compile the in-place prefill (fp32 and bf16 caches) now, or load it from numba's cache."""
    for dtype in (torch.float32, torch.bfloat16):
        cache = torch.zeros(1, 16, 1, 8, dtype=dtype)
        prefill_in_place(torch.zeros(2, 1, 8, dtype=dtype), cache, cache,
                         np.zeros((1, 1), np.int32), np.full(1, 2, np.int32),
                         np.array([0, 2], np.int32), 1.0)
