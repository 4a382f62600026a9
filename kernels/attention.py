"""Paged attention (decode and ragged/chunked prefill) over the paged KV cache.

Cache layout and metadata: kernels.metadata. On the CPU, decodes run through the numba kernel of
kernels.decode_cpu and a step's prefills through the one of kernels.prefill_cpu (fp32 and bf16
caches, both reading the blocks in place); other dtypes and head sizes take torch's SDPA over
each prefill's gathered keys. The Triton kernel reads blocks in place through the block table,
one program per (sequence, kv head, tile of query rows), online softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import jit, tl, triton, use_triton
from kernels.decode_cpu import attend_rows_in_place, can_attend_in_place
from kernels.metadata import AttentionMetadata, prefill_view
from kernels.prefill_cpu import can_prefill_in_place, prefill_in_place


# --- torch reference (the spec) ---------------------------------------------------------------

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

def _decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Decodes whose cache the in-place kernel does not take (a dtype other than fp32 / bf16, a
    non-contiguous cache; the engine makes neither): the reference, one query row each."""
    nd = q.shape[0]
    starts = torch.arange(nd + 1, dtype=torch.int32)
    return paged_attention_ref(q, k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
                               starts, scale)


def decode_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Decodes, q [nd, h, d] -> [nd, h, d], reading the cache blocks in place (numba)."""
    if meta.decode_arrays is None:          # once per step: numpy views of the decode rows
        nd = meta.num_decodes
        meta.decode_arrays = (meta.block_tables[:nd].numpy(), meta.seq_lens[:nd].numpy())
    return attend_rows_in_place(q, k_cache, v_cache, *meta.decode_arrays, scale)


def _prefill_cpu(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, n: int,
                 seq_len: int, slots: torch.Tensor, scale: float) -> torch.Tensor:
    """One prefill sequence: q [n, h, d] -> [n, h, d], causal over its seq_len keys, whose cache
    slots [seq_len] come off its block table (kernels.metadata.prefill_view)."""
    # [1, heads, tokens, d] with enable_gqa: torch's CPU flash kernel takes this shape. Query
    # heads broadcast against a [kvh, 1, L, d] key instead sent SDPA to its math path, slower
    # (kernels_bench.py --only attention, prefill rows; docs/BENCHMARKS.md).
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


# The step's prefills through kernels.prefill_cpu where it takes them. False sends every prefill
# through SDPA, one call each, as before that kernel: benchmarks.prefill --attention sdpa sets it
# for its A/B rounds.
PREFILL_IN_PLACE = True


def prefills_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Every prefill of the step, q [T - nd, h, d] -> [T - nd, h, d], in one numba call reading
    the cache in place (kernels.prefill_cpu)."""
    if meta.prefill_arrays is None:         # once per step: numpy views of the prefill rows
        nd = meta.num_decodes
        starts = meta.query_start_loc[nd:]
        meta.prefill_arrays = (meta.block_tables[nd:].numpy(), meta.seq_lens[nd:].numpy(),
                               (starts - starts[0]).numpy())
    return prefill_in_place(q, k_cache, v_cache, *meta.prefill_arrays, scale)


def _paged_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta: AttentionMetadata, scale: float) -> torch.Tensor:
    nd = meta.num_decodes
    has_prefills = meta.seq_lens.shape[0] > nd
    decode = decode_in_place if can_attend_in_place(q, k_cache, v_cache) else _decode_reference
    outs = [decode(q[:nd], k_cache, v_cache, meta, scale)] if nd else []
    if not has_prefills:
        return outs[0]
    if PREFILL_IN_PLACE and can_prefill_in_place(q, k_cache, v_cache):
        outs.append(prefills_in_place(q[nd:], k_cache, v_cache, meta, scale))
    else:
        outs += _prefills_sdpa(q, k_cache, v_cache, meta, scale)
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def _prefills_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta: AttentionMetadata, scale: float) -> list[torch.Tensor]:
    """Each prefill through SDPA over its gathered keys (_prefill_cpu), one call per prefill."""
    prefills = prefill_view(meta, k_cache.shape[1])     # made by the step's first layer
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    outs, start = [], meta.num_decodes
    for n, seq_len, slots in prefills:
        outs.append(_prefill_cpu(q[start:start + n], k_flat, v_flat, n, seq_len, slots, scale))
        start += n
    return outs


# --- Triton kernel ----------------------------------------------------------------------------

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

def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] -> out [num_tokens, num_heads, head_dim].

    Decodes come first in q (one token each), then each prefill's new tokens; every query sees
    its sequence's keys up to and including its own position.
    """
    if use_triton(q):
        return _paged_attention_triton(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                       meta.query_start_loc, meta.max_query_len, scale)
    return _paged_attention_cpu(q, k_cache, v_cache, meta, scale)
