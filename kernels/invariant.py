"""Batch-invariant variants of the engine's ops, for deterministic mode.

A row's result must not depend on which other rows share the step. Measured on this CPU (torch
2.13, fp32): F.linear gives bit-identical rows for any row count that is a multiple of 4, but a
matrix-vector product (1 row) and the ragged tail rows of a batch of fewer than 12 rows take other
kernels and round differently; bf16 was row-invariant at every count tried. So linear pads its
rows to a multiple of 4. Attention runs one sequence at a time over exactly its own keys, so
no padding from longer neighbours enters its reductions. fp32 decodes take the fast path's
in-place kernel, in one call for the batch: it computes each sequence on its own, the same way
whatever the batch (kernels.attention; a test checks it bitwise).
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
    """Like kernels.paged_attention, one sequence at a time. q [T, h, d] -> [T, h, d]."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    nd = meta.num_decodes
    outs: list[torch.Tensor] = []
    if nd and attention.decodes_in_place(q, k_cache, v_cache):
        outs.append(attention.decode_in_place(q[:nd], k_cache, v_cache,
                                              attention.paged_view(meta, k_cache.shape[1]), scale))
        work = []
    else:
        lens = meta.decode_mask.view(nd, -1).sum(-1).tolist() if nd else []
        work = [(1, n, meta.decode_slots[b, :n]) for b, n in enumerate(lens)]
    work += list(zip(meta.prefill_query_lens, meta.prefill_seq_lens, meta.prefill_slots))
    start = nd if outs else 0
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
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)
