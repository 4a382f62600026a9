"""Attention metadata: what every layer's attention reads in a step, built once per step.

Cache layout, per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim];
a slot is block_id * block_size + offset, and a block_table row lists a sequence's block ids.
Attention reads keys through block tables only (one entry per block, not per key); the views
below are derived from them once per step and shared by the layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step attention inputs, built once per step and shared by every layer.

    Sequences are ordered decodes first (one query row each), then prefills (ragged queries).
    The fields after max_query_len are views made on first use: the prefills' key slots
    (`prefill_view`, the CPU prefill), every query row as its own decode (`row_view`,
    deterministic mode), and the numpy views of the decode and prefill rows that the CPU
    kernels take.
    """

    slot_mapping: torch.Tensor          # [num_tokens] int64: each new token's slot, -1 = padding
    num_decodes: int                    # the first num_decodes sequences are decodes
    block_tables: torch.Tensor          # [num_seqs, max_blocks] int32, padding 0
    seq_lens: torch.Tensor              # [num_seqs] int32: cached + new keys
    query_start_loc: torch.Tensor       # [num_seqs + 1] int32: cumulative new tokens
    max_query_len: int
    prefills: list[tuple[int, int, torch.Tensor]] | None = None  # per prefill: new, keys, slots
    row_tables: torch.Tensor | None = None       # [num_tokens, max_blocks] int32: each row's table
    row_lens: torch.Tensor | None = None         # [num_tokens] int32: keys each query row sees
    decode_arrays: tuple[np.ndarray, np.ndarray] | None = None   # decode_in_place's numpy views
    prefill_arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # prefills_in_place's


def slots_for(block_table: list[int], num_tokens: int, block_size: int,
              start: int = 0) -> list[int]:
    """Cache slots of positions [start, num_tokens) of a sequence."""
    return [block_table[p // block_size] * block_size + p % block_size
            for p in range(start, num_tokens)]


def prefill_view(meta: AttentionMetadata, block_size: int) -> list[tuple[int, int, torch.Tensor]]:
    """Per prefill sequence (made once per step): its new tokens n, its keys seq_len (cached +
    new) and their cache slots [seq_len] int64, read off its block table."""
    if meta.prefills is None:
        first = meta.num_decodes
        starts = meta.query_start_loc[first:].tolist()
        lens = meta.seq_lens[first:].tolist()
        offsets = torch.arange(block_size, device=meta.block_tables.device)
        meta.prefills = []
        for j, seq_len in enumerate(lens):
            blocks = meta.block_tables[first + j, :(seq_len + block_size - 1) // block_size].long()
            slots = (blocks.unsqueeze(1) * block_size + offsets).view(-1)[:seq_len]   # [seq_len]
            meta.prefills.append((starts[j + 1] - starts[j], seq_len, slots))
    return meta.prefills


def row_view(meta: AttentionMetadata) -> AttentionMetadata:
    """Fill meta's per-row fields (once per step): every query row as its own decode. Row i of a
    sequence of n new tokens over seq_len keys sees its first seq_len - n + i + 1 keys."""
    if meta.row_tables is not None:
        return meta
    starts = meta.query_start_loc.tolist()
    seq_of_row: list[int] = []
    lens: list[int] = []
    for s, seq_len in enumerate(meta.seq_lens.tolist()):
        n = starts[s + 1] - starts[s]
        seq_of_row += [s] * n
        lens += range(seq_len - n + 1, seq_len + 1)
    device = meta.block_tables.device
    meta.row_tables = meta.block_tables[torch.tensor(seq_of_row, dtype=torch.long, device=device)]
    meta.row_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return meta
