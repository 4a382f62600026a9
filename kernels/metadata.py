"""Attention metadata: what every layer's attention reads in a step, built once per step.

Cache layout, per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim];
a slot is block_id * block_size + offset, and a block_table row lists a sequence's block ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
