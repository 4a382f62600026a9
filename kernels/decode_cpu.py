"""The fast CPU decode: numba kernels reading the paged cache in place through block tables.

The fast CPU decode path, for an fp32 or bf16 cache, is a numba kernel that reads the blocks in
place through the block table: each query row's keys cut into spans of SPAN_KEYS (work items,
split across threads), all kv heads of a block together, fp32 softmax per span (its exp eight
lanes at once, kernels.simd.exp8), the spans then combined in order. A 64-dim head's key and
value are widened once into registers and shared by the query heads of their group
(HEAD_IN_REGISTERS). Its timings against dense SDPA on the same keys and against the gather it
replaced are in docs/BENCHMARKS.md (benchmarks/kernels_bench.py --only attention). A row is cut
and combined the same way whatever the batch, so its output is bitwise batch-invariant. numba
has no bfloat16: a bf16 cache goes in as its int16 bits and each value is widened exactly in the
kernel (kernels.simd.as_f32). Other dtypes (which the engine never uses) take the torch reference
(kernels.attention). numba's threads are torch's: its OpenMP layer binds to the libgomp torch
loaded first (kernels.backend.start_numba), so a kernel called from the engine's one compute
thread, between torch's linear layers, runs on the same team of workers as they do.
fastmath is limited to reassociation and contraction (what vectorizes the
dot products and sums), so NaN and inf still propagate.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from kernels.backend import numba_threads
from kernels.simd import (WIDTH, as_f32, broadcast8, exp_sum, fma8, load8, mul8, prefetch, row_max,
                          store8, sum8)


_FASTMATH = {"reassoc", "contract", "arcp"}     # not nnan / ninf: NaN and inf must propagate


# Keys per work item of the in-place decode. A query row's keys are cut into spans of this many
# (whole blocks), each span an item of its own, so one long row keeps every core busy rather
# than one (kernels_bench --only attention, docs/BENCHMARKS.md). The cut depends only on the
# row's own length, never on the batch, so the output stays batch-invariant.
SPAN_KEYS = 128

# A head of this size (SmolLM2's, Llama 3.2 1B's, Qwen2.5 0.5B's) fits eight vector registers:
# each key and value is widened once and shared by the query heads of its group (_block_scores,
# _block_values). Other sizes take the plain loops, which LLVM vectorizes per query head. A
# loop over 64-dim pieces, for 128 and up, ran no faster than the plain loops on the Zen 5 box
# (its offsets no longer constants), so it is not here.
HEAD_IN_REGISTERS = 8 * WIDTH
# False: every head size takes the plain loops (kernels_bench --only attention times both).
WIDEN_ONCE = True


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, cache=True)
def _attend_span(q, k_cache, v_cache, table, b0, b1, seq_len, scale, scores, acc, ml, widen_once):  # type: ignore[no-untyped-def]
    """One item: query row q [kvh, group, d] over the keys in blocks [b0, b1) of its table
    (clipped to seq_len) -> per head, the scores' max m and sum l of exp(score - m) in ml
    [kvh, group, 2], and acc [kvh, group, d] = sum of exp(score - m) * value. widen_once:
    head_dim is HEAD_IN_REGISTERS, and the keys and values go through _block_scores and
    _block_values.

    Blocks are read in place, once each for keys and once for values, all kv heads together
    (a block's rows hold every head). scores [kvh, group, span rounded up to a multiple of
    WIDTH] is scratch; the softmax's max and exps are kernels.simd's row helpers (eight lanes,
    the tail through the same exp8).
    """
    num_kv_heads, group, head_dim = q.shape
    bs = k_cache.shape[1]
    n = min(b1 * bs, seq_len) - b0 * bs
    last = (seq_len - 1) // bs                                   # the row's last block
    line = 64 // k_cache.itemsize                                # values per cache line
    for b in range(b0, b1):
        # A row's blocks lie wherever the allocator found them, and a long-running server's are
        # scattered (freed blocks are reused in the order they were freed). Over scattered
        # blocks the hardware prefetcher cannot guess the next one: this kernel took about
        # twice as long there as over consecutive blocks without the lines below, 1.6-1.7x with
        # them (kernels_bench --only placement). So where the next key block is not the next in
        # memory, name it, and this block's values (read after the span's keys), to the CPU
        # before computing on this one. Consecutive blocks are left to the hardware:
        # prefetching them too cost more than it saved.
        nb = table[min(b + 1, last)]
        if nb != table[b] + 1:
            nxt = k_cache[nb]
            vals = v_cache[table[b]]
            for i in range(0, nxt.size, line):
                prefetch(nxt, i)
                prefetch(vals, i)
        blk = k_cache[table[b]]                                  # [bs, kvh, d]
        if widen_once:
            _block_scores(q, blk, min(bs, seq_len - b * bs), (b - b0) * bs, scale, scores)
            continue
        for o in range(min(bs, seq_len - b * bs)):
            for h in range(num_kv_heads):
                for g in range(group):
                    s = np.float32(0.0)
                    for x in range(head_dim):
                        s += q[h, g, x] * as_f32(blk[o, h, x])
                    scores[h, g, (b - b0) * bs + o] = s * scale
    for h in range(num_kv_heads):                                # exp, fp32, 8 lanes at once
        for g in range(group):
            row = scores[h, g, :n]
            m = row_max(row)
            ml[h, g, 0] = m
            ml[h, g, 1] = exp_sum(row, m, row)
    acc[:] = 0
    for b in range(b0, b1):
        blk = v_cache[table[b]]
        if widen_once:
            _block_values(scores, blk, min(bs, seq_len - b * bs), (b - b0) * bs, acc)
            continue
        for o in range(min(bs, seq_len - b * bs)):
            for h in range(num_kv_heads):
                for g in range(group):
                    w = scores[h, g, (b - b0) * bs + o]
                    for x in range(head_dim):
                        acc[h, g, x] += w * as_f32(blk[o, h, x])


@njit(nogil=True, boundscheck=False, inline="always")
def _head64(row):  # type: ignore[no-untyped-def]
    """A 64-dim head's row of the cache as eight fp32 vectors (a bf16 row widened exactly)."""
    return (load8(row, 0), load8(row, 8), load8(row, 16), load8(row, 24),
            load8(row, 32), load8(row, 40), load8(row, 48), load8(row, 56))


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, inline="always")
def _block_scores(q, blk, keys, j0, scale, scores):  # type: ignore[no-untyped-def]
    """scores[h, g, j0 + o] = scale * q[h, g] . key o of blk, for its first `keys` keys (head_dim
    HEAD_IN_REGISTERS). Each key's head is widened once into eight vectors and dotted with every
    query head of its group; the plain loops widen it again for each of them and reduce each
    product on its own (kernels_bench --only attention placement times both)."""
    num_kv_heads, group = q.shape[0], q.shape[1]
    for o in range(keys):
        j = j0 + o
        for h in range(num_kv_heads):
            k0, k1, k2, k3, k4, k5, k6, k7 = _head64(blk[o, h])
            for g in range(group):
                qg = q[h, g]
                s = mul8(load8(qg, 0), k0)
                s = fma8(load8(qg, 8), k1, s)
                s = fma8(load8(qg, 16), k2, s)
                s = fma8(load8(qg, 24), k3, s)
                s = fma8(load8(qg, 32), k4, s)
                s = fma8(load8(qg, 40), k5, s)
                s = fma8(load8(qg, 48), k6, s)
                s = fma8(load8(qg, 56), k7, s)
                scores[h, g, j] = sum8(s) * scale


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, inline="always")
def _block_values(scores, blk, keys, j0, acc):  # type: ignore[no-untyped-def]
    """acc[h, g] += scores[h, g, j0 + o] * value o of blk, for its first `keys` values (head_dim
    HEAD_IN_REGISTERS): each value's head widened once and added into every query head of its
    group."""
    num_kv_heads, group = acc.shape[0], acc.shape[1]
    for o in range(keys):
        j = j0 + o
        for h in range(num_kv_heads):
            v0, v1, v2, v3, v4, v5, v6, v7 = _head64(blk[o, h])
            for g in range(group):
                p = broadcast8(scores[h, g, j])
                a = acc[h, g]
                store8(a, 0, fma8(p, v0, load8(a, 0)))
                store8(a, 8, fma8(p, v1, load8(a, 8)))
                store8(a, 16, fma8(p, v2, load8(a, 16)))
                store8(a, 24, fma8(p, v3, load8(a, 24)))
                store8(a, 32, fma8(p, v4, load8(a, 32)))
                store8(a, 40, fma8(p, v5, load8(a, 40)))
                store8(a, 48, fma8(p, v6, load8(a, 48)))
                store8(a, 56, fma8(p, v7, load8(a, 56)))


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, cache=True)
def _combine(acc, ml, i0, i1, out):  # type: ignore[no-untyped-def]
    """A row's items i0 .. i1 - 1 -> its softmax-weighted values out [kvh, group, d]: rescaled
    to the row's max and added in item order (the same order whatever thread ran them)."""
    num_kv_heads, group, head_dim = out.shape
    for h in range(num_kv_heads):
        for g in range(group):
            m = ml[i0, h, g, 0]
            for i in range(i0 + 1, i1):
                m = max(m, ml[i, h, g, 0])
            total = np.float32(0.0)
            for i in range(i0, i1):
                total += ml[i, h, g, 1] * np.exp(ml[i, h, g, 0] - m)
            inv = np.float32(1.0) / total
            o = out[h, g]
            o[:] = 0
            for i in range(i0, i1):
                w = np.exp(ml[i, h, g, 0] - m) * inv
                a = acc[i, h, g]
                for x in range(head_dim):
                    o[x] += w * a[x]


@njit(nogil=True, boundscheck=False, inline="always")
def _scores(q, bs, span_blocks):  # type: ignore[no-untyped-def]
    """_attend_span's scratch: a span's keys per head, rounded up to whole vectors."""
    span = (span_blocks * bs + WIDTH - 1) // WIDTH * WIDTH
    return np.empty((q.shape[1], q.shape[2], span), np.float32)


@njit(nogil=True, boundscheck=False, cache=True)
def _items(seq_lens, bs, span_blocks):  # type: ignore[no-untyped-def]
    """Row r's items are starts[r] .. starts[r + 1] - 1; item i covers blocks b0[i] .. +span."""
    rows = seq_lens.shape[0]
    starts = np.empty(rows + 1, np.int64)
    starts[0] = 0
    for r in range(rows):
        blocks = (seq_lens[r] + bs - 1) // bs
        starts[r + 1] = starts[r] + max(1, (blocks + span_blocks - 1) // span_blocks)
    row_of = np.empty(starts[rows], np.int64)
    b0 = np.empty(starts[rows], np.int64)
    for r in range(rows):
        for i in range(starts[r], starts[r + 1]):
            row_of[i] = r
            b0[i] = (i - starts[r]) * span_blocks
    return starts, row_of, b0


@njit(nogil=True, boundscheck=False, cache=True)
def _workspace(q, seq_lens, bs, span_blocks):  # type: ignore[no-untyped-def]
    """The items (_items) and each item's partial results: acc [items, kvh, group, d] and its
    max and sum, ml [items, kvh, group, 2]."""
    starts, row_of, b0 = _items(seq_lens, bs, span_blocks)
    acc = np.empty((row_of.shape[0], q.shape[1], q.shape[2], q.shape[3]), np.float32)
    ml = np.empty((row_of.shape[0], q.shape[1], q.shape[2], 2), np.float32)
    return starts, row_of, b0, acc, ml


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, parallel=True, cache=True)
def _decode_parallel(q, k_cache, v_cache, block_tables, seq_lens, scale, span_blocks, widen_once,
                     out):  # type: ignore[no-untyped-def]
    starts, row_of, b0, acc, ml = _workspace(q, seq_lens, k_cache.shape[1], span_blocks)
    for i in prange(row_of.shape[0]):        # items split across threads
        r = row_of[i]
        scores = _scores(q, k_cache.shape[1], span_blocks)
        _attend_span(q[r], k_cache, v_cache, block_tables[r], b0[i], b0[i] + span_blocks,
                     seq_lens[r], scale, scores, acc[i], ml[i], widen_once)
    for r in prange(seq_lens.shape[0]):
        _combine(acc, ml, starts[r], starts[r + 1], out[r])


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, cache=True)
def _decode_serial(q, k_cache, v_cache, block_tables, seq_lens, scale, span_blocks, widen_once,
                   out):  # type: ignore[no-untyped-def]
    """_decode_parallel without a parallel launch, for a single item (the same functions, so
    the same bits)."""
    starts, row_of, b0, acc, ml = _workspace(q, seq_lens, k_cache.shape[1], span_blocks)
    scores = _scores(q, k_cache.shape[1], span_blocks)
    for i in range(row_of.shape[0]):
        r = row_of[i]
        _attend_span(q[r], k_cache, v_cache, block_tables[r], b0[i], b0[i] + span_blocks,
                     seq_lens[r], scale, scores, acc[i], ml[i], widen_once)
    for r in range(seq_lens.shape[0]):
        _combine(acc, ml, starts[r], starts[r + 1], out[r])


def can_attend_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the in-place kernel takes these: fp32 or bf16 (read as its int16 bits and widened
    in the kernel: numba has no bf16 type), on the CPU, contiguous caches."""
    return (q.dtype == k_cache.dtype == v_cache.dtype
            and q.dtype in (torch.float32, torch.bfloat16) and not q.is_cuda
            and k_cache.is_contiguous() and v_cache.is_contiguous())


def kernel_views(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """What the in-place kernels (this one and kernels.prefill_cpu) take: q [T, h, d] as fp32
    [T, kvh, group, d] (a copy only where it is not that already), an empty output of that
    shape, and the caches as numpy arrays (a bf16 cache as its int16 bits)."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    qd = q.reshape(rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
    if qd.dtype != torch.float32 or not qd.is_contiguous():
        qd = qd.to(torch.float32).contiguous()
    if k_cache.dtype == torch.bfloat16:
        k_cache, v_cache = k_cache.view(torch.int16), v_cache.view(torch.int16)
    return qd, torch.empty_like(qd), k_cache.numpy(), v_cache.numpy()


def attend_rows_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         tables: torch.Tensor | np.ndarray, lens: torch.Tensor | np.ndarray,
                         scale: float) -> torch.Tensor:
    """q [R, h, d] -> [R, h, d]: query row r attends to the first lens[r] keys of the block table
    tables[r], read in place (numba). A row's result depends only on its query, those keys and
    lens[r], never on the other rows. Arithmetic is fp32; a bf16 result is rounded once, at the
    end (as SDPA does). tables and lens may be given as numpy arrays already (see
    decode_in_place: each layer would otherwise convert them again)."""
    rows, num_heads, head_dim = q.shape
    qd, out, kc, vc = kernel_views(q, k_cache, v_cache)
    tables = tables.numpy() if isinstance(tables, torch.Tensor) else tables
    lens = lens.numpy() if isinstance(lens, torch.Tensor) else lens
    bs = k_cache.shape[1]
    span_blocks = max(1, SPAN_KEYS // bs)
    widen_once = WIDEN_ONCE and head_dim == HEAD_IN_REGISTERS
    args = (qd.numpy(), kc, vc, tables, lens, np.float32(scale), span_blocks, widen_once,
            out.numpy())
    if rows == 1 and lens[0] <= span_blocks * bs:
        _decode_serial(*args)               # one item: a parallel launch would only cost
    else:
        numba_threads()
        _decode_parallel(*args)
    out = out.view(rows, num_heads, head_dim)
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def warm_up() -> None:
    """Compile the in-place decode (fp32 and bf16 caches, one row and many) now (or load it from
    numba's on-disk cache)."""
    for dtype in (torch.float32, torch.bfloat16):
        cache = torch.zeros(1, 16, 1, 16, dtype=dtype)
        for rows in (1, 2):
            attend_rows_in_place(torch.zeros(rows, 1, 16, dtype=dtype), cache, cache,
                                 torch.zeros(rows, 1, dtype=torch.int32),
                                 torch.ones(rows, dtype=torch.int32), 1.0)
