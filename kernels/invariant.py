"""Batch-invariant variants of the engine's ops, for deterministic mode.

A row's result must not depend on which other rows share the step. Measured on this CPU (torch
2.13, fp32): F.linear gives bit-identical rows for any row count that is a multiple of 4, but a
matrix-vector product (1 row) and the ragged tail rows of a batch of fewer than 12 rows take other
kernels and round differently; bf16 was row-invariant at every count tried. So linear pads its
rows to a multiple of 4. Attention runs one sequence at a time over exactly its own keys, so
no padding from longer neighbours enters its reductions. In fp32 and bf16 every query row, decode
or prefill, goes through the fast path's in-place kernel in one call for the batch, as a row that
attends to the keys up to its own position: the kernel computes each row on its own, the same way
whatever the batch, so a position's result does not depend on whether it was computed as a
decode, in a prefill chunk or as a grammar-forced row (kernels.attention; tests check both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import attention
from kernels.attention import AttentionMetadata

ROW_MULTIPLE = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with rows padded to a multiple of ROW_MULTIPLE. x [T, in] -> [T, out]."""
    pad = -x.shape[0] % ROW_MULTIPLE
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    out = F.linear(x, weight, bias)
    return out[: out.shape[0] - pad] if pad else out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Like kernels.paged_attention, q [T, h, d] -> [T, h, d]: in fp32 and bf16 every row on its
    own in place, otherwise one sequence at a time."""
    if attention.can_attend_in_place(q, k_cache, v_cache):
        meta = attention.row_view(meta, k_cache.shape[1])          # once per step, not per layer
        assert meta.row_tables is not None and meta.row_lens is not None
        return attention.attend_rows_in_place(q, k_cache, v_cache, meta.row_tables,
                                              meta.row_lens, scale)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    nd = meta.num_decodes
    bs = k_cache.shape[1]
    meta = attention.paged_view(meta, bs)
    assert meta.block_tables is not None and meta.seq_lens is not None
    lens = meta.seq_lens[:nd].tolist()
    work = [(1, n, torch.tensor(attention.slots_for(meta.block_tables[b].tolist(), n, bs)))
            for b, n in enumerate(lens)]
    work += list(zip(meta.prefill_query_lens, meta.prefill_seq_lens, meta.prefill_slots))
    outs, start = [], 0
    for n, seq_len, slots in work:
        qs = q[start:start + n].view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        k = k_flat[slots].transpose(0, 1).unsqueeze(1).to(q.dtype)     # [kvh, 1, L, d]
        v = v_flat[slots].transpose(0, 1).unsqueeze(1).to(q.dtype)
        # Which call a row takes depends only on its own sequence's step shape, which the
        # scheduler fixes in deterministic mode (aligned prompt chunks, then one token a step).
        if n == 1 or n == seq_len:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=n > 1, scale=scale)
        else:
            pos = torch.arange(seq_len - n, seq_len).unsqueeze(1)
            mask = torch.arange(seq_len).unsqueeze(0) <= pos               # [n, L]
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)
        outs.append(o.permute(2, 0, 1, 3).reshape(n, num_heads, head_dim))
        start += n
    return torch.cat(outs, 0)
