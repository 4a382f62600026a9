"""Paged KV cache store and paged attention (decode and ragged/chunked prefill).

Cache layout, per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim];
a slot is block_id * block_size + offset, and a block_table row lists a sequence's block ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step attention inputs, built once per step and shared by every layer.

    Sequences are ordered decodes first (one query each), then prefills (ragged queries).
    """

    slot_mapping: torch.Tensor          # [num_tokens] int64: cache slot of each new token
    num_decodes: int
    decode_slots: torch.Tensor          # [num_decodes, max_decode_len] int64 (padding -> slot 0)
    decode_mask: torch.Tensor           # [num_decodes, 1, 1, max_decode_len] bool, True = attend
    prefill_query_lens: list[int]       # per prefill sequence: new tokens this step
    prefill_seq_lens: list[int]         # per prefill sequence: cached + new tokens
    prefill_slots: list[torch.Tensor]   # per prefill sequence: [seq_len] int64 slots of its keys


def slots_for(block_table: list[int], num_tokens: int, block_size: int) -> list[int]:
    """Cache slots of positions [0, num_tokens) of a sequence."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(num_tokens)]


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the cache at slot_mapping."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] -> out [num_tokens, num_heads, head_dim].

    Decodes are batched into one call over keys gathered by slot; prefills run per sequence,
    causal over cached plus new keys.
    """
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    outs = []
    nd = meta.num_decodes
    if nd:
        # A decode's query heads of one kv group share keys and position, so fold the group into
        # the query-length axis: q [B, kvh, group, d] against k [B, kvh, L, d], no kv expansion.
        qd = q[:nd].view(nd, num_kv_heads, group, head_dim)
        k = k_flat[meta.decode_slots].transpose(1, 2)          # [B, kvh, L, d]
        v = v_flat[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, k.to(q.dtype), v.to(q.dtype),
                                           attn_mask=meta.decode_mask, scale=scale)
        outs.append(o.reshape(nd, num_heads, head_dim))
    start = nd
    for n, seq_len, slots in zip(meta.prefill_query_lens, meta.prefill_seq_lens, meta.prefill_slots):
        qp = q[start:start + n].view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        k = k_flat[slots].transpose(0, 1).unsqueeze(1).to(q.dtype)   # [kvh, 1, L, d]
        v = v_flat[slots].transpose(0, 1).unsqueeze(1).to(q.dtype)
        if n == seq_len:
            o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scale)
        else:
            # Query i sits at position seq_len - n + i and sees keys 0 ..= that position.
            pos = torch.arange(seq_len - n, seq_len).unsqueeze(1)
            mask = torch.arange(seq_len).unsqueeze(0) <= pos                 # [n, L]
            o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale)
        outs.append(o.permute(2, 0, 1, 3).reshape(n, num_heads, head_dim))   # [n, h, d]
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)
