from __future__ import annotations

import pytest
import torch

from kernels import apply_rotary, rms_norm
from kernels import rmsnorm
from kernels.rmsnorm import _rms_norm_triton, rms_norm_ref
from kernels.rotary import _rotate_triton, apply_rotary_ref

DTYPES = [torch.float32, torch.bfloat16]


def bf16_tol(dtype: torch.dtype) -> dict[str, float]:
    # Triton's interpreter truncates fp32 -> bf16 where a GPU rounds to nearest, so interpreted
    # bf16 results may sit an ulp (or, after a cancelling sum, a few ulps of the operands) away.
    return {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}


def norm_inputs(num_tokens: int, hidden: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(num_tokens + hidden)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    residual = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    return x, residual, weight


def rotary_inputs(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype):
    g = torch.Generator().manual_seed(num_tokens * head_dim)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)     # strided views,
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim]      # as in the model
    k = k.view(num_tokens, num_kv_heads, head_dim)
    pos = torch.randint(0, 2048, (num_tokens,), generator=g).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    return q, k, emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_rms_norm_cpu_equals_reference(dtype: torch.dtype, with_residual: bool,
                                       num_tokens: int) -> None:
    x, residual, weight = norm_inputs(num_tokens, 576, dtype)
    r = residual if with_residual else None
    out, new_residual = rms_norm(x, weight, 1e-5, r)
    ref_out, ref_residual = rms_norm_ref(x, weight, 1e-5, r)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    assert torch.equal(new_residual, ref_residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 5, 8, 100, 576, 1536, 2049])
def test_rms_norm_numba_equals_reference_bit_for_bit(hidden: int, dtype: torch.dtype) -> None:
    # The numba path adds the squares in torch's order; any other order moves logprobs. bf16:
    # int16 bits widened, rounded where the reference's bf16 ops round (kernels/bf16_bits.py).
    lanes = rmsnorm._torch_lanes()
    if not lanes:
        pytest.skip("this torch build sums in an order the numba path does not reproduce")
    for num_tokens in (1, 3, 33, rmsnorm.PARALLEL_ROWS + 37):     # the last split across threads
        x, residual, weight = norm_inputs(num_tokens, hidden, dtype)
        for r in (residual, None):
            out, summed = rmsnorm._norm_numba(x * 7, weight, 1e-6, r, lanes)
            ref_out, ref_summed = rms_norm_ref(x * 7, weight, 1e-6, r)
            assert torch.equal(out, ref_out) and torch.equal(summed, ref_summed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("hidden", [64, 576])
def test_rms_norm_triton_matches_reference(interpret: None, dtype: torch.dtype,
                                           with_residual: bool, hidden: int) -> None:
    x, residual, weight = norm_inputs(5, hidden, dtype)
    r = residual if with_residual else None
    out, new_residual = rms_norm(x, weight, 1e-5, r)               # Triton under the fixture
    ref_out, ref_residual = rms_norm_ref(x, weight, 1e-5, r)
    torch.testing.assert_close(out, ref_out, **bf16_tol(dtype))
    torch.testing.assert_close(new_residual, ref_residual, **bf16_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,group", [(3, 3), (2, 1), (1, 4)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_cpu_equals_reference(dtype: torch.dtype, num_kv_heads: int, group: int,
                                     head_dim: int) -> None:
    q, k, cos, sin = rotary_inputs(6, num_kv_heads * group, num_kv_heads, head_dim, dtype)
    out_q, out_k = apply_rotary(q, k, cos, sin)
    ref_q, ref_k = apply_rotary_ref(q, k, cos, sin)
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,group,head_dim", [(3, 3, 64), (1, 4, 128), (2, 1, 64)])
def test_rotary_triton_matches_reference(interpret: None, dtype: torch.dtype, num_kv_heads: int,
                                         group: int, head_dim: int) -> None:
    q, k, cos, sin = rotary_inputs(4, num_kv_heads * group, num_kv_heads, head_dim, dtype)
    out_q, out_k = apply_rotary(q, k, cos, sin)                     # Triton under the fixture
    ref_q, ref_k = apply_rotary_ref(q, k, cos, sin)
    torch.testing.assert_close(out_q, ref_q, **bf16_tol(dtype))
    torch.testing.assert_close(out_k, ref_k, **bf16_tol(dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_rotary_cuda(cuda: torch.device, dtype: torch.dtype) -> None:
    x, residual, weight = norm_inputs(300, 576, dtype)
    out, new_residual = _rms_norm_triton(x.to(cuda), weight.to(cuda), 1e-5, residual.to(cuda))
    ref_out, ref_residual = rms_norm_ref(x, weight, 1e-5, residual)
    tol = bf16_tol(dtype)
    torch.testing.assert_close(out.cpu(), ref_out, **tol)
    assert torch.equal(new_residual.cpu(), ref_residual)
    q, k, cos, sin = rotary_inputs(300, 9, 3, 64, dtype)
    ref_q, _ = apply_rotary_ref(q, k, cos, sin)
    torch.testing.assert_close(_rotate_triton(q.to(cuda), cos.to(cuda), sin.to(cuda)).cpu(), ref_q, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [6, 101])      # 101: rows split across numba's threads
@pytest.mark.parametrize("d", [64, 128, 40])      # 40: half not a multiple of 8 (scalar heads)
def test_rotate_and_store_equals_rotary_then_store(dtype: torch.dtype, tokens: int, d: int) -> None:
    """The fused CPU path (rotate q and k, store k and v, one numba call) gives the bits of the
    reference rotary followed by the store, skips -1 slots, and refuses a slot past the cache;
    in fp32 and in bf16 (int16 bits, rounded where the reference's bf16 ops round)."""
    from kernels import rotate_and_store
    g = torch.Generator().manual_seed(4)
    h, kvh = 9, 3
    qkv = (5 * torch.randn(tokens, (h + 2 * kvh) * d, generator=g)).to(dtype)
    pos = torch.randint(0, 400, (tokens,), generator=g)
    cos, sin = torch.randn(400, d, generator=g)[pos], torch.randn(400, d, generator=g)[pos]
    slots = torch.randperm(8 * 16, generator=g)[:tokens]
    slots[2] = -1
    caches = [torch.randn(8, 16, kvh, d, generator=g).to(dtype) for _ in range(2)]
    kc, vc = caches[0].clone(), caches[1].clone()
    q = rotate_and_store(qkv, h, kvh, cos, sin, kc, vc, slots)
    qr, kr, vr = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    want_q, want_k = apply_rotary_ref(qr.reshape(-1, h, d), kr.reshape(-1, kvh, d), cos, sin)
    kw, vw = caches[0].clone(), caches[1].clone()
    stored = slots >= 0
    kw.view(-1, kvh, d)[slots[stored]] = want_k[stored]
    vw.view(-1, kvh, d)[slots[stored]] = vr.reshape(-1, kvh, d)[stored]
    assert torch.equal(q, want_q) and torch.equal(kc, kw) and torch.equal(vc, vw)
    untouched = next(i for i in range(8 * 16) if i not in slots.tolist())
    assert torch.equal(kc.view(-1, kvh, d)[untouched], caches[0].view(-1, kvh, d)[untouched])
    past = slots.clone()
    past[-1] = 8 * 16
    with pytest.raises(IndexError):
        rotate_and_store(qkv, h, kvh, cos, sin, kc, vc, past)
