from __future__ import annotations

import pytest
import torch

from kernels import AttentionMetadata, decode_cpu, paged_attention, slots_for
from kernels.attention import _paged_attention_triton, paged_attention_ref

# (cached tokens, new tokens) per sequence, decodes (one new token) first. Lengths 1, block
# boundaries (16, 32) and one past them, a fresh prefill, chunked prefills of 1 and many tokens.
RAGGED = [(0, 1), (15, 1), (16, 1), (32, 1), (0, 5), (16, 16), (40, 1), (3, 30)]


def build(seqs: list[tuple[int, int]], block_size: int, num_kv_heads: int, group: int,
          head_dim: int, dtype: torch.dtype, seed: int = 0):
    """Random cache, queries and block-table metadata built the way engine/model_runner.py
    builds them (one row per sequence: these decodes have one new token each)."""
    g = torch.Generator().manual_seed(seed)
    need = [(c + n + block_size - 1) // block_size for c, n in seqs]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()      # scattered blocks
    tables, used = [], 0
    for k in need:
        tables.append(perm[used:used + k])
        used += k
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    num_tokens = sum(n for _, n in seqs)
    q = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=g).to(dtype)
    num_decodes = 0
    while num_decodes < len(seqs) and seqs[num_decodes][1] == 1:
        num_decodes += 1
    slot_mapping = []
    for (c, n), table in zip(seqs, tables):
        slot_mapping += slots_for(table, c + n, block_size, c)
    width = max(need)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    seq_lens = torch.tensor([c + n for c, n in seqs], dtype=torch.int32)
    starts = torch.tensor([0] + [n for _, n in seqs]).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long), num_decodes=num_decodes,
        block_tables=block_tables, seq_lens=seq_lens, query_start_loc=starts,
        max_query_len=max(n for _, n in seqs))
    return q, k_cache, v_cache, meta, (block_tables, seq_lens, starts)


def key_slots(meta: AttentionMetadata, seq: int, block_size: int) -> torch.Tensor:
    """The cache slots [seq_len] of sequence seq's keys, off its block table."""
    table = meta.block_tables[seq].tolist()
    return torch.tensor(slots_for(table, int(meta.seq_lens[seq]), block_size))


# Decodes for the in-place kernel: short rows, block boundaries, and rows cut into several spans
# of SPAN_KEYS keys (128 keys: one span; 129: two; 300: three).
DECODES = [(0, 1), (15, 1), (16, 1), (31, 1), (47, 1), (100, 1), (127, 1), (128, 1), (299, 1),
           (3, 1)]


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [40, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_matches_reference(block_size: int, group: int, head_dim: int,
                                    dtype: torch.dtype) -> None:
    q, kc, vc, meta, (bt, lens, starts) = build(RAGGED, block_size, 2, group, head_dim, dtype)
    expected = paged_attention_ref(q, kc, vc, bt, lens, starts, head_dim ** -0.5)
    out = paged_attention(q, kc, vc, meta, head_dim ** -0.5)
    torch.testing.assert_close(out, expected, **tol(dtype))


@pytest.mark.parametrize("seqs", [[(0, 1)], [(33, 1), (0, 1)], [(0, 7)], [(5, 3), (16, 16)]])
def test_cpu_path_decode_only_and_prefill_only(seqs: list[tuple[int, int]]) -> None:
    q, kc, vc, meta, (bt, lens, starts) = build(seqs, 16, 3, 3, 64, torch.float32)
    expected = paged_attention_ref(q, kc, vc, bt, lens, starts, 0.125)
    torch.testing.assert_close(paged_attention(q, kc, vc, meta, 0.125), expected, **tol(torch.float32))


# Interpreted Triton is slow: a covering set of the (block size, GQA ratio, head dim, dtype) grid.
TRITON_CASES = [(16, 1, 64, torch.float32), (32, 3, 64, torch.float32), (16, 4, 128, torch.float32),
                (32, 1, 128, torch.bfloat16), (16, 3, 64, torch.bfloat16), (32, 4, 64, torch.bfloat16)]


@pytest.mark.parametrize("block_size,group,head_dim,dtype", TRITON_CASES)
def test_triton_attention_matches_reference(interpret: None, block_size: int, group: int,
                                            head_dim: int, dtype: torch.dtype) -> None:
    q, kc, vc, meta, (bt, lens, starts) = build(RAGGED, block_size, 2, group, head_dim, dtype)
    expected = paged_attention_ref(q, kc, vc, bt, lens, starts, head_dim ** -0.5)
    out = paged_attention(q, kc, vc, meta, head_dim ** -0.5)       # Triton under the fixture
    torch.testing.assert_close(out, expected, **tol(dtype))


def test_triton_attention_ignores_nan_past_seq_len(interpret: None) -> None:
    q, kc, vc, meta, (bt, lens, starts) = build([(0, 1), (3, 2)], 16, 1, 3, 64, torch.float32)
    expected = paged_attention_ref(q, kc, vc, bt, lens, starts, 0.125)
    kc[bt[:, 0].long(), 8:] = float("nan")                          # beyond every sequence's keys
    vc[bt[:, 0].long(), 8:] = float("nan")
    out = _paged_attention_triton(q, kc, vc, bt, lens, starts, 2, 0.125)
    torch.testing.assert_close(out, expected, **tol(torch.float32))


@pytest.mark.cuda
@pytest.mark.parametrize("block_size,group,head_dim,dtype", TRITON_CASES)
def test_triton_attention_cuda(cuda: torch.device, block_size: int, group: int, head_dim: int,
                               dtype: torch.dtype) -> None:
    seqs = RAGGED + [(500, 1), (0, 300), (200, 77)]
    q, kc, vc, meta, (bt, lens, starts) = build(seqs, block_size, 2, group, head_dim, dtype)
    expected = paged_attention_ref(q, kc, vc, bt, lens, starts, head_dim ** -0.5)
    args = [t.to(cuda) for t in (q, kc, vc, bt, lens, starts)]
    out = _paged_attention_triton(*args, max(n for _, n in seqs), head_dim ** -0.5)
    torch.testing.assert_close(out.cpu(), expected, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_matches_gather_by_slot(dtype: torch.dtype) -> None:
    """The fast decode (in place, numba) against SDPA over a plain per-slot gather (the engine's
    parity with transformers was established on it): within an ulp in fp32. A bf16 cache is
    computed in fp32 and rounded once, so it is within half a bf16 ulp of fp32 SDPA on the same
    bf16 values, and no further from it than bf16 SDPA is."""
    import torch.nn.functional as F
    seqs = DECODES
    q, kc, vc, meta, _ = build(seqs, 16, 3, 3, 64, dtype)
    nd = len(seqs)
    slots = [key_slots(meta, i, 16) for i in range(nd)]
    max_len = max(len(s) for s in slots)
    padded = torch.stack([F.pad(s, (0, max_len - len(s))) for s in slots])   # padding -> slot 0
    mask = torch.zeros(nd, 1, 1, max_len, dtype=torch.bool)
    for b, s in enumerate(slots):
        mask[b, 0, 0, :len(s)] = True
    k = kc.view(-1, 3, 64)[padded].transpose(1, 2)
    v = vc.view(-1, 3, 64)[padded].transpose(1, 2)

    def sdpa(t: torch.dtype) -> torch.Tensor:
        return F.scaled_dot_product_attention(q.view(nd, 3, 3, 64).to(t), k.to(t), v.to(t),
                                              attn_mask=mask, scale=0.125).reshape(nd, 9, 64)
    out = paged_attention(q, kc, vc, meta, 0.125)
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, sdpa(dtype), rtol=0, atol=1e-6)
    else:
        exact = sdpa(torch.float32)
        torch.testing.assert_close(out.float(), exact, rtol=2 ** -8, atol=1e-6)
        assert (out.float() - exact).abs().max() <= (sdpa(dtype).float() - exact).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_is_batch_invariant(dtype: torch.dtype) -> None:
    """Decodes read their blocks in place, each row cut into spans by its own length: a
    sequence's output is bitwise the same alone (a one-span row: the kernel's serial entry; a
    longer one: its spans on both threads) as in any batch."""
    seqs = DECODES
    q, kc, vc, meta, _ = build(seqs, 16, 3, 3, 64, dtype)
    assert decode_cpu.can_attend_in_place(q, kc, vc)
    together = paged_attention(q, kc, vc, meta, 0.125)
    assert decode_cpu.SPAN_KEYS == 128
    for i in range(len(seqs)):
        q1, kc1, vc1, meta1, _ = build([seqs[i]], 16, 3, 3, 64, dtype)
        # the same keys and query, in a cache of one sequence
        slots, slots1 = key_slots(meta, i, 16), key_slots(meta1, 0, 16)
        kc1.view(-1, 3, 64)[slots1] = kc.view(-1, 3, 64)[slots]
        vc1.view(-1, 3, 64)[slots1] = vc.view(-1, 3, 64)[slots]
        alone = paged_attention(q[i:i + 1].clone(), kc1, vc1, meta1, 0.125)
        assert torch.equal(alone[0], together[i])


def test_cpu_decode_nan_key_stays_in_its_sequence() -> None:
    """A NaN in one sequence's keys makes that sequence's output NaN (fastmath does not assume
    it away) and leaves the other sequences alone."""
    seqs = [(10, 1), (20, 1), (5, 1), (299, 1)]
    q, kc, vc, meta, (tables, _, _) = build(seqs, 16, 3, 3, 64, torch.float32)
    clean = paged_attention(q, kc, vc, meta, 0.125)
    kc[tables[1, 0], 3, 0, 7] = float("nan")                        # a key of sequence 1
    vc[tables[3, 17], 2, 1, 0] = float("nan")       # a value in sequence 3's third span
    out = paged_attention(q, kc, vc, meta, 0.125)
    assert torch.isnan(out[1]).any() and torch.isnan(out[3]).any()
    assert torch.equal(out[0], clean[0]) and torch.equal(out[2], clean[2])


def test_cpu_fallback_for_caches_the_kernel_does_not_take() -> None:
    """fp16 caches (no in-place kernel) take the reference for decodes: the same answer as fp32
    on the same values, to fp16 rounding."""
    seqs = [(3, 1), (20, 1), (0, 7), (16, 5)]
    q, kc, vc, meta, _ = build(seqs, 16, 3, 3, 64, torch.float16)
    assert not decode_cpu.can_attend_in_place(q, kc, vc)
    out = paged_attention(q, kc, vc, meta, 0.125)
    assert out.dtype == torch.float16
    expected = paged_attention(q.float(), kc.float(), vc.float(), meta, 0.125)
    torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_gives_the_same_bits_on_consecutive_and_scattered_blocks(dtype: torch.dtype) -> None:
    """The decode kernel names scattered blocks to the CPU ahead of use (a prefetch hint) and
    leaves consecutive ones to the hardware: where a row's blocks lie changes no bit."""
    lens = [40, 130, 7, 300]
    need = [(n + 15) // 16 for n in lens]
    g = torch.Generator().manual_seed(3)
    keys = [torch.randn(n * 16, 3, 64, generator=g).to(dtype) for n in need]
    values = [torch.randn(n * 16, 3, 64, generator=g).to(dtype) for n in need]
    q = torch.randn(len(lens), 9, 64, generator=g).to(dtype)
    outs = []
    for order in (torch.arange(sum(need)), torch.randperm(sum(need), generator=g)):
        kc = torch.zeros(sum(need), 16, 3, 64, dtype=dtype)
        vc = torch.zeros_like(kc)
        tables, used = [], 0
        for n, k, v in zip(need, keys, values):
            table = order[used:used + n]
            kc[table], vc[table] = k.view(n, 16, 3, 64), v.view(n, 16, 3, 64)
            tables.append(table.tolist() + [0] * (max(need) - n))
            used += n
        bt, sl = torch.tensor(tables, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)
        outs.append(decode_cpu.attend_rows_in_place(q, kc, vc, bt, sl, 0.125))
        expected = paged_attention_ref(q, kc, vc, bt, sl, torch.arange(len(lens) + 1,
                                                                        dtype=torch.int32), 0.125)
        torch.testing.assert_close(outs[-1], expected, **tol(dtype))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_widened_once_agrees_with_the_plain_loops(dtype: torch.dtype,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64-dim head takes the path that widens each key and value once for its group
    (decode_cpu.HEAD_IN_REGISTERS); the plain loops (WIDEN_ONCE off) compute the same sums in
    another order: within a few fp32 ulps."""
    q, kc, vc, meta, _ = build(DECODES, 16, 3, 3, 64, dtype)
    fast = paged_attention(q, kc, vc, meta, 0.125)
    monkeypatch.setattr(decode_cpu, "WIDEN_ONCE", False)
    plain = paged_attention(q, kc, vc, meta, 0.125)
    assert decode_cpu.HEAD_IN_REGISTERS == 64
    if dtype == torch.float32:
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-6)
        assert not torch.equal(fast, plain)          # the two paths really are different code
    else:
        torch.testing.assert_close(fast.float(), plain.float(), rtol=0, atol=8e-3)
