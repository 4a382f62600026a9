"""Deterministic mode's ops (kernels/invariant.py): a row computed inside a batch of any size from
1 to 64, at any place in it, gives the same bits as alone; and each op still computes what the
plain op computes (to rounding)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import AttentionMetadata, invariant
from kernels.attention import paged_attention_ref
from kernels.rmsnorm import rms_norm_ref
from tests.kernels.test_attention import build

SIZES = range(1, 65)


def rows_are_invariant(op, x: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    """op over x [64, ...]: for every batch size n, the batch x[k : k + n] (k moving the rows to
    other places) gives row by row the bits op gives each row alone."""
    alone = torch.cat([op(x[i:i + 1]) for i in range(x.shape[0])])
    for n in SIZES:
        k = (7 * n) % (x.shape[0] - n + 1)
        assert torch.equal(op(x[k:k + n]), alone[k:k + n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features", [48, 100, 1003])       # panel-aligned and padded
def test_linear_rows_invariant(dtype: torch.dtype, out_features: int) -> None:
    g = torch.Generator().manual_seed(out_features)
    w = torch.randn(out_features, 300, generator=g).to(dtype)        # 300: a chunk and a tail
    bias = torch.randn(out_features, generator=g).to(dtype)
    layer = invariant.prepare_linear(w, bias)
    x = torch.randn(64, 300, generator=g).to(dtype)
    rows_are_invariant(lambda t: invariant.linear(t, layer), x)
    out = invariant.linear(x, layer)
    assert out.dtype == dtype and out.shape == (64, out_features)
    want = F.linear(x.float(), w.float(), bias.float())
    torch.testing.assert_close(out.float(), want, **({"rtol": 1e-5, "atol": 1e-4} if dtype ==
                               torch.float32 else {"rtol": 2 ** -7, "atol": 1e-2}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_rows_invariant(dtype: torch.dtype, with_residual: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 1000, generator=g) * 3).to(dtype)
    r = torch.randn(64, 1000, generator=g).to(dtype)
    w = torch.randn(1000, generator=g).to(dtype)

    def norm(t: torch.Tensor) -> torch.Tensor:        # t: x and r side by side
        res = t[:, 1000:].contiguous() if with_residual else None
        out, summed = invariant.rms_norm(t[:, :1000].contiguous(), w, 1e-5, res)
        return torch.cat([out, summed], 1)
    rows_are_invariant(norm, torch.cat([x, r], 1))
    out, summed = invariant.rms_norm(x, w, 1e-5, r if with_residual else None)
    want, want_summed = rms_norm_ref(x, w, 1e-5, r if with_residual else None)
    assert torch.equal(summed, want_summed)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2 ** -7, "atol": 1e-2}
    torch.testing.assert_close(out.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_rows_invariant(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(64, 2 * 163, generator=g) * 4).to(dtype)       # 163: vectors and a tail
    x[0, 5], x[1, 170] = float("inf"), float("-inf")
    rows_are_invariant(invariant.silu_mul, x)
    gate, up = x.float().chunk(2, -1)
    want = F.silu(gate) * up
    torch.testing.assert_close(invariant.silu_mul(x).float(), want.to(dtype).float(),
                               **({"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else
                                  {"rtol": 2 ** -7, "atol": 1e-2}), equal_nan=True)


@pytest.mark.parametrize("name", ["log_softmax", "softmax", "exp", "cumsum"])
def test_vocabulary_reductions_rows_invariant(name: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1003, generator=g) * 5                      # 1003: not a multiple of 8
    x[3, :500] = float("-inf")                                      # a grammar-masked row
    if name == "cumsum":
        x = x.exp()
    op = getattr(invariant, name)
    rows_are_invariant(op, x)
    want = {"log_softmax": lambda t: torch.log_softmax(t, -1), "softmax": lambda t: torch.softmax(t, -1),
            "exp": torch.exp, "cumsum": lambda t: torch.cumsum(t, -1)}[name](x)
    torch.testing.assert_close(op(x), want, rtol=2e-6, atol=2e-6)


def decode_rows(tables: torch.Tensor, lens: torch.Tensor) -> AttentionMetadata:
    """Metadata for rows that each attend to the first lens[r] keys of table r."""
    n = lens.shape[0]
    return AttentionMetadata(torch.zeros(0, dtype=torch.long), n, block_tables=tables, seq_lens=lens,
                             query_start_loc=torch.arange(n + 1, dtype=torch.int32), max_query_len=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_rows_invariant(dtype: torch.dtype) -> None:
    """64 query rows of lengths 1 to 300 (one to three 128-key spans, over scattered blocks):
    each row alone and inside every batch size gives the same bits, with one thread or two."""
    lens_list = [1 + (37 * i) % 300 for i in range(64)]
    q, kc, vc, _, (tables, seq_lens, _) = build([(n - 1, 1) for n in lens_list], 16, 2, 3, 24,
                                                dtype, seed=4)

    def attend(rows: slice) -> torch.Tensor:
        return invariant.paged_attention(q[rows].clone(), kc, vc,
                                         decode_rows(tables[rows], seq_lens[rows]), 0.2)
    alone = torch.cat([attend(slice(i, i + 1)) for i in range(64)])
    for n in SIZES:
        k = (7 * n) % (64 - n + 1)
        assert torch.equal(attend(slice(k, k + n)), alone[k:k + n]), n
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)                         # numba follows torch's thread count
        assert torch.equal(attend(slice(0, 64)), alone)
    finally:
        torch.set_num_threads(threads)
    want = paged_attention_ref(q, kc, vc, tables, seq_lens, torch.arange(65, dtype=torch.int32), 0.2)
    torch.testing.assert_close(alone.float(), want.float(), **({"rtol": 1e-5, "atol": 1e-5} if dtype
                               == torch.float32 else {"rtol": 2 ** -7, "atol": 1e-2}))


def test_attention_prefill_rows_equal_decodes() -> None:
    """A position gives bitwise the same result whether it is a row of a prefill chunk, of a
    mixed batch, or a decode on its own."""
    seqs = [(3, 1), (20, 1), (0, 7), (16, 5), (30, 18)]          # decodes, then prefills
    q, kc, vc, meta, (tables, seq_lens, starts) = build(seqs, 16, 2, 2, 16, torch.float32, seed=3)
    batched = invariant.paged_attention(q, kc, vc, meta, 0.25)
    expected = paged_attention_ref(q, kc, vc, tables, seq_lens, starts, 0.25)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
    for s, (c, n) in enumerate(seqs):
        for i in range(n):
            row = int(starts[s]) + i
            alone = invariant.paged_attention(
                q[row:row + 1].clone(), kc, vc,
                decode_rows(tables[s:s + 1], torch.tensor([c + i + 1], dtype=torch.int32)), 0.25)
            assert torch.equal(alone[0], batched[row]), (s, i)


def test_attention_refuses_what_it_cannot_compute_invariantly() -> None:
    q, kc, vc, meta, _ = build([(3, 1)], 16, 2, 2, 16, torch.float16)
    with pytest.raises(ValueError, match="deterministic mode"):
        invariant.paged_attention(q, kc, vc, meta, 0.25)
