"""Paged KV cache store and paged attention (decode and ragged/chunked prefill).

Cache layout, per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim];
a slot is block_id * block_size + offset, and a block_table row lists a sequence's block ids.

The fast CPU decode path, for an fp32 or bf16 cache, is a numba kernel that reads the blocks in
place through the block table: each query row's keys cut into spans of SPAN_KEYS (work items,
split across threads), all kv heads of a block together, fp32 softmax per span (its exp eight
lanes at once, kernels.simd.exp8), the spans then combined in order. It runs at 0.4-0.7x the
time of dense SDPA on the same keys held contiguously from 8 sequences on, and 0.7-1.5x for one
512-key row (docs/BENCHMARKS.md); the gather it replaced was 1.5-2.2x. A row is cut and combined
the same way whatever the batch, so its output is bitwise batch-invariant. numba has no
bfloat16: a bf16 cache goes in as its int16 bits and each value is widened exactly in the kernel
(kernels.simd.as_f32). Other dtypes (which the engine never uses) take the torch reference.
numba's threads come from its own OpenMP runtime (the system libgomp, not torch's copy);
interleaved with torch's linear layers on the engine's compute thread, the two did not slow each
other in a side-by-side check, and the engine's steps got faster (docs/BENCHMARKS.md). fastmath
is limited to reassociation and contraction (what vectorizes the dot products and sums), so NaN
and inf still propagate. The Triton kernel reads blocks in place through the block table, one
program per (sequence, kv head, tile of query rows), online softmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from kernels.backend import jit, numba_threads, tl, triton, use_triton
from kernels.simd import (WIDTH, add8, as_f32, broadcast8, exp8, lane8, load8, max8, store8,
                          sub8, zeros8)


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step attention inputs, built once per step and shared by every layer.

    Sequences are ordered decodes first (one query each), then prefills (ragged queries).
    The next four fields after those are the block-table view the fast paths use. The runner may
    fill them; left at their defaults they are derived from the fields above on first use
    (`paged_view`). Then the per-row view deterministic mode uses (`row_view`), and
    decode_in_place's numpy views of the decode rows (made on first use).
    """

    slot_mapping: torch.Tensor          # [num_tokens] int64: cache slot of each new token
    num_decodes: int
    # The decode rows' keys as padded slot lists; None when the block-table fields below are
    # given (the engine gives those: a slot list has an entry per key, a block table one per
    # block of keys).
    decode_slots: torch.Tensor | None   # [num_decodes, max_decode_len] int64 (padding -> slot 0)
    decode_mask: torch.Tensor | None    # [num_decodes, 1, 1, max_decode_len] bool, True = attend
    prefill_query_lens: list[int]       # per prefill sequence: new tokens this step
    prefill_seq_lens: list[int]         # per prefill sequence: cached + new tokens
    prefill_slots: list[torch.Tensor]   # per prefill sequence: [seq_len] int64 slots of its keys
    block_tables: torch.Tensor | None = None     # [num_seqs, max_blocks] int32, padding 0
    seq_lens: torch.Tensor | None = None         # [num_seqs] int32: cached + new keys
    query_start_loc: torch.Tensor | None = None  # [num_seqs + 1] int32: cumulative new tokens
    max_query_len: int = 0
    row_tables: torch.Tensor | None = None       # [num_tokens, max_blocks] int32: each row's table
    row_lens: torch.Tensor | None = None         # [num_tokens] int32: keys each query row sees
    decode_arrays: tuple[np.ndarray, np.ndarray] | None = None   # decode_in_place's numpy views


def slots_for(block_table: list[int], num_tokens: int, block_size: int,
              start: int = 0) -> list[int]:
    """Cache slots of positions [start, num_tokens) of a sequence."""
    return [block_table[p // block_size] * block_size + p % block_size
            for p in range(start, num_tokens)]


def paged_view(meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
    """Fill meta's block-table fields from its slot lists (once per step; layers reuse them).

    Position p of a sequence lives in slot block_table[p // block_size] * block_size + p % bs,
    so the slots at positions 0, bs, 2*bs, ... divided by bs are its block table.
    """
    if meta.block_tables is not None:
        return meta
    assert meta.decode_slots is not None and meta.decode_mask is not None
    nd = meta.num_decodes
    decode_lens = meta.decode_mask.view(nd, -1).sum(-1).tolist() if nd else []
    tables = [row[::block_size] // block_size for row in meta.decode_slots[:nd]]
    tables += [slots[::block_size] // block_size for slots in meta.prefill_slots]
    seq_lens = decode_lens + list(meta.prefill_seq_lens)
    query_lens = [1] * nd + list(meta.prefill_query_lens)
    max_blocks = max((len(t) for t in tables), default=0)
    block_tables = torch.zeros(len(tables), max_blocks, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, :len(t)] = t
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    device = meta.slot_mapping.device
    meta.block_tables = block_tables.to(device)
    meta.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    meta.query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
    meta.max_query_len = max(query_lens, default=0)
    return meta


def row_view(meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
    """Fill meta's per-row fields (once per step): every query row as its own decode. Row i of a
    prefill of n new tokens over seq_len keys sees its sequence's first seq_len - n + i + 1 keys."""
    if meta.row_tables is not None:
        return meta
    paged_view(meta, block_size)
    assert meta.block_tables is not None and meta.seq_lens is not None
    nd = meta.num_decodes
    seq_of_row = list(range(nd))
    lens = meta.seq_lens[:nd].tolist()
    for j, (n, seq_len) in enumerate(zip(meta.prefill_query_lens, meta.prefill_seq_lens)):
        seq_of_row += [nd + j] * n
        lens += range(seq_len - n + 1, seq_len + 1)
    meta.row_tables = meta.block_tables[torch.tensor(seq_of_row, dtype=torch.long)]
    meta.row_lens = torch.tensor(lens, dtype=torch.int32, device=meta.block_tables.device)
    return meta


# --- torch reference (the spec) ---------------------------------------------------------------

def store_kvcache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] at slot_mapping, one token at a time."""
    bs = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:                                  # -1: a padding token, not stored
            k_cache[slot // bs, slot % bs] = key[t]
            v_cache[slot // bs, slot % bs] = value[t]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor,
                        query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """Per sequence: keys read block by block, fp32 softmax, causal over cached + new keys."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[s], starts[s + 1]
        n = q_end - q_start
        blocks = block_tables[s, :(seq_len + bs - 1) // bs].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()   # [L, kvh, d]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        group = num_heads // num_kv_heads
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)                     # [h, L, d]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qs = q[q_start:q_end].float().transpose(0, 1)                             # [h, n, d]
        scores = qs @ k.transpose(1, 2) * scale                                   # [h, n, L]
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device).unsqueeze(1)
        visible = torch.arange(seq_len, device=q.device).unsqueeze(0) <= q_pos    # [n, L]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[q_start:q_end] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return out


# --- fast CPU path ----------------------------------------------------------------------------

@njit(nogil=True, boundscheck=False, cache=True)
def _store_rows(key, value, k_flat, v_flat, slots):  # type: ignore[no-untyped-def]
    num_slots = k_flat.shape[0]
    for t in range(slots.shape[0]):
        slot = slots[t]
        if slot < 0:
            continue                      # -1: a padding token, not stored (as in the reference)
        if slot >= num_slots:
            raise IndexError("slot_mapping points outside the KV cache")
        k_flat[slot] = key[t]
        v_flat[slot] = value[t]


def _store_kvcache_cpu(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    if (key.dtype == value.dtype == k_cache.dtype == v_cache.dtype == torch.float32
            and slot_mapping.dtype == torch.long and value.shape == key.shape
            and slot_mapping.shape == key.shape[:1]):
        # One numba call instead of two index_copy_ (kernels_bench --only store); the keys and
        # values may be the strided slices of the qkv output.
        _store_rows(key.numpy(), value.numpy(), k_flat.numpy(), v_flat.numpy(),
                    slot_mapping.numpy())
        return
    k_flat.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_flat.index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Decodes whose cache the in-place kernel does not take (a dtype other than fp32 / bf16, a
    non-contiguous cache; the engine makes neither): the reference, one query row each."""
    nd = q.shape[0]
    assert meta.block_tables is not None and meta.seq_lens is not None
    starts = torch.arange(nd + 1, dtype=torch.int32)
    return paged_attention_ref(q, k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
                               starts, scale)


_FASTMATH = {"reassoc", "contract", "arcp"}     # not nnan / ninf: NaN and inf must propagate


# Keys per work item of the in-place decode. A query row's keys are cut into spans of this many
# (whole blocks), each span an item of its own, so one long row keeps both cores busy: one
# 512-key row took 1.52-1.85x dense SDPA's time on one thread, 0.69-1.52x (five runs) as four
# items (kernels_bench --only attention, docs/BENCHMARKS.md). The cut depends only on the row's own
# length, never on the batch, so the output stays batch-invariant.
SPAN_KEYS = 128


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, cache=True)
def _attend_span(q, k_cache, v_cache, table, b0, b1, seq_len, scale, scores, acc, ml):  # type: ignore[no-untyped-def]
    """One item: query row q [kvh, group, d] over the keys in blocks [b0, b1) of its table
    (clipped to seq_len) -> per head, the scores' max m and sum l of exp(score - m) in ml
    [kvh, group, 2], and acc [kvh, group, d] = sum of exp(score - m) * value.

    Blocks are read in place, once each for keys and once for values, all kv heads together
    (a block's rows hold every head). scores [kvh, group, span rounded up to a multiple of
    WIDTH] is scratch: the exp's last vector may run past n into it.
    """
    num_kv_heads, group, head_dim = q.shape
    bs = k_cache.shape[1]
    n = min(b1 * bs, seq_len) - b0 * bs
    for b in range(b0, b1):
        blk = k_cache[table[b]]                                  # [bs, kvh, d]
        for o in range(min(bs, seq_len - b * bs)):
            for h in range(num_kv_heads):
                for g in range(group):
                    s = np.float32(0.0)
                    for x in range(head_dim):
                        s += q[h, g, x] * as_f32(blk[o, h, x])
                    scores[h, g, (b - b0) * bs + o] = s * scale
    for h in range(num_kv_heads):                                # exp, fp32, 8 lanes at once
        for g in range(group):
            row = scores[h, g]
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
            mv = broadcast8(m)
            sums = zeros8()
            p = 0
            while p + WIDTH <= n:
                e = exp8(sub8(load8(row, p), mv))
                store8(row, p, e)
                sums = add8(sums, e)
                p += WIDTH
            total = np.float32(0.0)
            for lane in range(WIDTH):
                total += lane8(sums, lane)
            if p < n:   # the tail: one more vector over the scratch's spare lanes, n - p counted
                e = exp8(sub8(load8(row, p), mv))
                store8(row, p, e)
                for lane in range(n - p):
                    total += lane8(e, lane)
            ml[h, g, 0] = m
            ml[h, g, 1] = total
    acc[:] = 0
    for b in range(b0, b1):
        blk = v_cache[table[b]]
        for o in range(min(bs, seq_len - b * bs)):
            for h in range(num_kv_heads):
                for g in range(group):
                    w = scores[h, g, (b - b0) * bs + o]
                    for x in range(head_dim):
                        acc[h, g, x] += w * as_f32(blk[o, h, x])


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
def _decode_parallel(q, k_cache, v_cache, block_tables, seq_lens, scale, span_blocks, out):  # type: ignore[no-untyped-def]
    starts, row_of, b0, acc, ml = _workspace(q, seq_lens, k_cache.shape[1], span_blocks)
    for i in prange(row_of.shape[0]):        # items split across threads
        r = row_of[i]
        scores = _scores(q, k_cache.shape[1], span_blocks)
        _attend_span(q[r], k_cache, v_cache, block_tables[r], b0[i], b0[i] + span_blocks,
                     seq_lens[r], scale, scores, acc[i], ml[i])
    for r in prange(seq_lens.shape[0]):
        _combine(acc, ml, starts[r], starts[r + 1], out[r])


@njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, cache=True)
def _decode_serial(q, k_cache, v_cache, block_tables, seq_lens, scale, span_blocks, out):  # type: ignore[no-untyped-def]
    """_decode_parallel without a parallel launch, for a single item (the same functions, so
    the same bits)."""
    starts, row_of, b0, acc, ml = _workspace(q, seq_lens, k_cache.shape[1], span_blocks)
    scores = _scores(q, k_cache.shape[1], span_blocks)
    for i in range(row_of.shape[0]):
        r = row_of[i]
        _attend_span(q[r], k_cache, v_cache, block_tables[r], b0[i], b0[i] + span_blocks,
                     seq_lens[r], scale, scores, acc[i], ml[i])
    for r in range(seq_lens.shape[0]):
        _combine(acc, ml, starts[r], starts[r + 1], out[r])


def can_attend_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the in-place kernel takes these: fp32 or bf16 (read as its int16 bits and widened
    in the kernel: numba has no bf16 type), on the CPU, contiguous caches."""
    return (q.dtype == k_cache.dtype == v_cache.dtype
            and q.dtype in (torch.float32, torch.bfloat16) and not q.is_cuda
            and k_cache.is_contiguous() and v_cache.is_contiguous())


def attend_rows_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         tables: torch.Tensor | np.ndarray, lens: torch.Tensor | np.ndarray,
                         scale: float) -> torch.Tensor:
    """q [R, h, d] -> [R, h, d]: query row r attends to the first lens[r] keys of the block table
    tables[r], read in place (numba). A row's result depends only on its query, those keys and
    lens[r], never on the other rows. Arithmetic is fp32; a bf16 result is rounded once, at the
    end (as SDPA does). tables and lens may be given as numpy arrays already (see
    decode_in_place: each layer would otherwise convert them again)."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    qd = q.reshape(rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
    if qd.dtype != torch.float32 or not qd.is_contiguous():
        qd = qd.to(torch.float32).contiguous()
    out = torch.empty_like(qd)
    if k_cache.dtype == torch.bfloat16:
        kc, vc = k_cache.view(torch.int16).numpy(), v_cache.view(torch.int16).numpy()
    else:
        kc, vc = k_cache.numpy(), v_cache.numpy()
    tables = tables.numpy() if isinstance(tables, torch.Tensor) else tables
    lens = lens.numpy() if isinstance(lens, torch.Tensor) else lens
    bs = k_cache.shape[1]
    span_blocks = max(1, SPAN_KEYS // bs)
    args = (qd.numpy(), kc, vc, tables, lens, np.float32(scale), span_blocks, out.numpy())
    if rows == 1 and lens[0] <= span_blocks * bs:
        _decode_serial(*args)               # one item: a parallel launch would only cost
    else:
        numba_threads()
        _decode_parallel(*args)
    out = out.view(rows, num_heads, head_dim)
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def decode_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Decodes, q [nd, h, d] -> [nd, h, d], reading the cache blocks in place (numba)."""
    assert meta.block_tables is not None and meta.seq_lens is not None
    if meta.decode_arrays is None:          # once per step: numpy views of the decode rows
        nd = meta.num_decodes
        meta.decode_arrays = (meta.block_tables[:nd].numpy(), meta.seq_lens[:nd].numpy())
    return attend_rows_in_place(q, k_cache, v_cache, *meta.decode_arrays, scale)


def warm_up() -> None:
    """Compile the in-place decode (fp32 and bf16 caches, one row and many) and the KV store now
    (~5 s cold, ~0.3 s from numba's on-disk cache)."""
    for dtype in (torch.float32, torch.bfloat16):
        cache = torch.zeros(1, 16, 1, 16, dtype=dtype)
        for rows in (1, 2):
            attend_rows_in_place(torch.zeros(rows, 1, 16, dtype=dtype), cache, cache,
                                 torch.zeros(rows, 1, dtype=torch.int32),
                                 torch.ones(rows, dtype=torch.int32), 1.0)
    kc = torch.zeros(1, 16, 1, 4)
    for tokens in (1, 2):      # one token's slices are contiguous to numba, more tokens' strided
        kv = torch.ones(tokens, 2, 4)
        _store_kvcache_cpu(kv[:, :1], kv[:, 1:], kc, kc.clone(), torch.arange(tokens))


def _prefill_cpu(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, n: int,
                 seq_len: int, slots: torch.Tensor, scale: float) -> torch.Tensor:
    """One prefill sequence: q [n, h, d] -> [n, h, d], causal over its seq_len keys."""
    # [1, heads, tokens, d] with enable_gqa: torch's CPU flash kernel takes this shape. Query
    # heads broadcast against a [kvh, 1, L, d] key instead sent SDPA to its math path, 2-3x
    # slower for 100-500-token prefills here (kernels_bench.py --only attention, prefill rows).
    qp = q.transpose(0, 1).unsqueeze(0)                                        # [1, h, n, d]
    k = k_flat.index_select(0, slots).transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, kvh, L, d]
    v = v_flat.index_select(0, slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
    if n == seq_len:
        o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # Query i sits at position seq_len - n + i and sees keys 0 ..= that position.
        pos = torch.arange(seq_len - n, seq_len).unsqueeze(1)
        mask = torch.arange(seq_len).unsqueeze(0) <= pos                        # [n, L]
        o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def _paged_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta: AttentionMetadata, scale: float) -> torch.Tensor:
    nd = meta.num_decodes
    decode = decode_in_place if can_attend_in_place(q, k_cache, v_cache) else _decode_reference
    decodes = q[:nd] if meta.prefill_query_lens else q
    outs = [decode(decodes, k_cache, v_cache, meta, scale)] if nd else []
    if not meta.prefill_query_lens:
        return outs[0]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    start = nd
    for n, seq_len, slots in zip(meta.prefill_query_lens, meta.prefill_seq_lens, meta.prefill_slots):
        outs.append(_prefill_cpu(q[start:start + n], k_flat, v_flat, n, seq_len, slots, scale))
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


# --- Triton kernels ---------------------------------------------------------------------------

@jit
def _store_kvcache_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                          key_stride, value_stride, ROW: tl.constexpr, BLOCK: tl.constexpr):
    # grid: (num_tokens,); a token's kv heads are ROW = num_kv_heads * head_dim contiguous values,
    # and so is a cache slot.
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < ROW
    if slot >= 0:                                    # -1: a padding token, not stored
        k = tl.load(key_ptr + t * key_stride + offs, mask=ok)
        v = tl.load(value_ptr + t * value_stride + offs, mask=ok)
        tl.store(k_cache_ptr + slot * ROW + offs, k, mask=ok)
        tl.store(v_cache_ptr + slot * ROW + offs, v, mask=ok)


def _store_kvcache_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    row = num_kv_heads * head_dim
    assert value.shape == key.shape and k_cache.shape == v_cache.shape
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), "cache heads/dim differ from key's"
    assert key.dtype == value.dtype == k_cache.dtype == v_cache.dtype, "no casts in the kernel"
    assert key.stride(1) == head_dim and key.stride(2) == 1, "a token's key must be contiguous"
    assert value.stride(1) == head_dim and value.stride(2) == 1, "a token's value must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert slot_mapping.numel() == num_tokens and slot_mapping.device == key.device
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](key, value, k_cache, v_cache, slot_mapping,
                                         key.stride(0), value.stride(0),
                                         ROW=row, BLOCK=triton.next_power_of_2(row))


@jit
def _paged_attention_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                            seq_lens_ptr, query_start_ptr, scale,
                            stride_qt, stride_qh, stride_ot, stride_oh,
                            stride_cb, stride_cs, stride_ch, stride_bt,
                            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    # grid: (num_seqs, num_kv_heads, cdiv(max_query_len * GROUP, BLOCK_M)). The rows of a tile
    # are (query token, head of the kv group) pairs, row = token * GROUP + head_in_group, so a
    # decode's GROUP heads share one tile and one read of each key block.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = tok < q_len
    dims = tl.arange(0, HEAD_DIM)
    q_off = (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    # Dots take fp32 operands: "tf32" is exact for bf16/fp16 values, and Triton's interpreter
    # multiplies bf16 operands as raw integers (triton 3.9), so bf16 dots could not be tested.
    q = tl.load(q_ptr + q_off + dims[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32)                                                           # [M, D]
    q_pos = seq_len - q_len + tok                # absolute position of each row's token

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys past the tile's last query position are invisible to every row of the tile.
    last_tok = tl.minimum((tl.program_id(2) * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
    kv_end = seq_len - q_len + last_tok + 1
    offs_n = tl.arange(0, BLOCK_SIZE)
    for j in range(0, tl.cdiv(kv_end, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_bt + j).to(tl.int64)
        k_pos = j * BLOCK_SIZE + offs_n
        in_seq = k_pos < seq_len
        c_off = block * stride_cb + offs_n[:, None] * stride_cs + kv_head * stride_ch + dims[None, :]
        k = tl.load(k_cache_ptr + c_off).to(tl.float32)                            # [N, D]
        # Slots past seq_len may hold anything (even NaN): zero them so p @ v stays finite.
        v = tl.load(v_cache_ptr + c_off, mask=in_seq[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale          # [M, N]
        visible = (k_pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_off = (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(out_ptr + o_off + dims[None, :], acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor,
                            query_start_loc: torch.Tensor, max_query_len: int,
                            scale: float) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    _, bs, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of kv heads"
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[3] == head_dim and k_cache.stride(3) == 1 and q.stride(2) == 1
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and cache dtypes differ"
    assert head_dim & (head_dim - 1) == 0 and bs >= 16 and bs & (bs - 1) == 0, \
        "head_dim and block_size must be powers of two (block_size >= 16 for tl.dot)"
    assert block_tables.dtype == seq_lens.dtype == query_start_loc.dtype == torch.int32
    assert block_tables.stride(1) == 1 and seq_lens.numel() + 1 == query_start_loc.numel()
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    num_seqs = seq_lens.numel()
    if num_seqs == 0:
        return out
    block_m = 16 if max_query_len * group <= 16 else 32
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_query_len * group, block_m))
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=bs, BLOCK_M=block_m,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return out


# --- public -----------------------------------------------------------------------------------

def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the cache at slot_mapping."""
    if use_triton(key) and key.dtype == k_cache.dtype:
        _store_kvcache_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        _store_kvcache_cpu(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] -> out [num_tokens, num_heads, head_dim].

    Decodes come first in q (one token each), then each prefill's new tokens; every query sees
    its sequence's keys up to and including its own position.
    """
    paged_view(meta, k_cache.shape[1])
    if use_triton(q):
        assert meta.block_tables is not None and meta.seq_lens is not None
        assert meta.query_start_loc is not None
        return _paged_attention_triton(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                       meta.query_start_loc, meta.max_query_len, scale)
    return _paged_attention_cpu(q, k_cache, v_cache, meta, scale)
