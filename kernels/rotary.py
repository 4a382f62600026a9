"""Rotary position embedding (the rotate-half layout transformers' llama uses)."""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from kernels.backend import PARALLEL_ROWS, jit, split_rows, tl, triton, use_triton
from kernels.bf16_bits import narrow, round_in_place, widen
from kernels.simd import WIDTH, add8, load8, mul8, sub8
from kernels.simd_bf16 import round8, store_rounded8
from kernels.kv_store import store_kvcache


# --- torch reference (the spec) ---------------------------------------------------------------

def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, h, d], k [T, kvh, d]; cos/sin [T, d] for each token's position."""
    cos = cos.unsqueeze(1).to(q.dtype)
    sin = sin.unsqueeze(1).to(q.dtype)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# --- fast CPU path ----------------------------------------------------------------------------
# fp32: q and k rotated in one numba call, each head's halves read in place from strided views
# (slices of a qkv output). The engine's model calls rotate_and_store instead (the same
# per-head arithmetic, with the keys and values written to the cache in the same call). The
# reference is ~10 torch ops (cat, neg, four muls, two adds, casts), each a pass over the
# tensors (timings: kernels_bench --only norm, docs/BENCHMARKS.md). No fastmath: each output is
# x1*c - x2*s rounded as the reference rounds it, so the result equals the reference bit for bit.

@njit(nogil=True, boundscheck=False, inline="always")
def _rotate_head(src, at, c, s, dst, to, half):  # type: ignore[no-untyped-def]
    # Slices first: indices from 0 need no wraparound check, and the loops vectorize.
    x1, x2 = src[at:at + half], src[at + half:at + 2 * half]
    o1, o2 = dst[to:to + half], dst[to + half:to + 2 * half]
    c1, c2, s1, s2 = c[:half], c[half:2 * half], s[:half], s[half:2 * half]
    for i in range(half):
        o1[i] = x1[i] * c1[i] - x2[i] * s1[i]
    for i in range(half):
        o2[i] = x2[i] * c2[i] + x1[i] * s2[i]


@njit(nogil=True, boundscheck=False, cache=True)
def _rotate_rows(x, cos, sin, out):  # type: ignore[no-untyped-def]
    tokens, heads, dim = x.shape
    for t in range(tokens):
        for h in range(heads):
            _rotate_head(x[t, h], 0, cos[t], sin[t], out[t, h], 0, dim // 2)


@njit(nogil=True, boundscheck=False, cache=True)
def _rotate_qk(q, k, cos, sin, q_out, k_out):  # type: ignore[no-untyped-def]
    _rotate_rows(q, cos, sin, q_out)
    _rotate_rows(k, cos, sin, k_out)


def _numba_takes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    tokens, dim = q.shape[0], q.shape[-1]
    return (q.dtype == k.dtype == cos.dtype == sin.dtype == torch.float32
            and q.dim() == k.dim() == 3 and k.shape[0] == tokens and k.shape[-1] == dim
            and cos.shape == sin.shape == (tokens, dim) and dim % 2 == 0
            and not (q.requires_grad or k.requires_grad or cos.requires_grad or sin.requires_grad))


def _rotary_cpu(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not _numba_takes(q, k, cos, sin):
        return apply_rotary_ref(q, k, cos, sin)
    q_out, k_out = torch.empty(q.shape), torch.empty(k.shape)
    _rotate_qk(q.numpy(), k.numpy(), cos.numpy(), sin.numpy(), q_out.numpy(), k_out.numpy())
    return q_out, k_out


@njit(nogil=True, boundscheck=False, inline="always")
def _cache_slot(slots, t, num_slots):  # type: ignore[no-untyped-def]
    """Token t's cache row; -1: a padding token, not stored."""
    slot = slots[t]
    if slot >= num_slots:
        raise IndexError("slot_mapping points outside the KV cache")
    return slot


@njit(nogil=True, boundscheck=False, inline="always")
def _check_slots(slots, num_slots):  # type: ignore[no-untyped-def]
    """_cache_slot's check for all rows at once, for a parallel driver to make before its prange:
    an exception raised inside a numba parallel loop does not reach the caller (the write it
    guards would land outside the cache); one raised before the loop does."""
    if slots.size and slots.max() >= num_slots:
        raise IndexError("slot_mapping points outside the KV cache")


@njit(nogil=True, boundscheck=False, cache=True)
def _rotate_store(qkv, num_heads, num_kv_heads, cos, sin, q_out, k_flat, v_flat, slots, t0, t1):  # type: ignore[no-untyped-def]
    """Rows t0 .. t1 - 1 of qkv [T, (h + 2 kvh) * d] -> q_out [T, h * d] rotated; k rotated and
    v as it is written to their cache rows k_flat / v_flat [slots, kvh * d] at slots[t] (-1:
    not stored)."""
    dim = cos.shape[1]
    half = dim // 2
    values = (num_heads + num_kv_heads) * dim
    for t in range(t0, t1):
        row, c, s = qkv[t], cos[t], sin[t]
        for h in range(num_heads):
            _rotate_head(row, h * dim, c, s, q_out[t], h * dim, half)
        slot = _cache_slot(slots, t, k_flat.shape[0])
        if slot < 0:
            continue                      # -1: a padding token, not stored (as in the reference)
        k_row, v_row = k_flat[slot], v_flat[slot]
        for h in range(num_kv_heads):
            _rotate_head(row, (num_heads + h) * dim, c, s, k_row, h * dim, half)
        for i in range(num_kv_heads * dim):
            v_row[i] = row[values + i]


@njit(nogil=True, boundscheck=False, inline="always")
def _rotate_head_bf16(row, at, c, s, a_bits, b_bits, dst, to, half):  # type: ignore[no-untyped-def]
    """One head of a widened bf16 row -> its bf16 bits in dst[to:], rounded where the
    reference's bf16 ops round: each product, then the sum (c, s: bf16-rounded already)."""
    a, b = a_bits.view(np.float32), b_bits.view(np.float32)
    x1, x2 = row[at:at + half], row[at + half:at + 2 * half]
    for i in range(half):
        a[i] = x1[i] * c[i]
        a[half + i] = x2[i] * c[half + i]
        b[i] = x2[i] * s[i]
        b[half + i] = x1[i] * s[half + i]
    round_in_place(a_bits)
    round_in_place(b_bits)
    for i in range(half):
        a[i] = a[i] - b[i]
        a[half + i] = a[half + i] + b[half + i]
    narrow(a_bits, dst[to:to + 2 * half])


@njit(nogil=True, boundscheck=False, inline="always")
def _rotate_head_bf16_8(row, at, c, s, dst, to, half):  # type: ignore[no-untyped-def]
    """_rotate_head_bf16 eight lanes at a time (half a multiple of 8), rounding at the same
    places: the same bits, in registers rather than through scratch rows and their passes."""
    for i in range(0, half, WIDTH):
        x1, x2 = load8(row, at + i), load8(row, at + half + i)
        a1, a2 = round8(mul8(x1, load8(c, i))), round8(mul8(x2, load8(c, half + i)))
        b1, b2 = round8(mul8(x2, load8(s, i))), round8(mul8(x1, load8(s, half + i)))
        store_rounded8(dst, to + i, sub8(a1, b1))
        store_rounded8(dst, to + half + i, add8(a2, b2))


@njit(nogil=True, boundscheck=False, cache=True)
def _rotate_store_bf16(qkv, num_heads, num_kv_heads, cos, sin, q_out, k_flat, v_flat, slots, t0, t1):  # type: ignore[no-untyped-def]
    """_rotate_store for a bf16 body: qkv, q_out, k_flat and v_flat are int16 bf16 bits
    (kernels/bf16_bits.py); cos and sin fp32, rounded to bf16 first as the reference casts them."""
    dim = cos.shape[1]
    half = dim // 2
    values = (num_heads + num_kv_heads) * dim
    row_bits = np.empty(qkv.shape[1], np.uint32)
    c_bits, s_bits = np.empty(dim, np.uint32), np.empty(dim, np.uint32)
    a_bits, b_bits = np.empty(dim, np.uint32), np.empty(dim, np.uint32)
    row, c, s = row_bits.view(np.float32), c_bits.view(np.float32), s_bits.view(np.float32)
    lanes = half % WIDTH == 0
    for t in range(t0, t1):
        widen(qkv[t, :values], row_bits)
        c[:] = cos[t]
        s[:] = sin[t]
        round_in_place(c_bits)
        round_in_place(s_bits)
        q_row = q_out[t]
        for h in range(num_heads):
            if lanes:
                _rotate_head_bf16_8(row, h * dim, c, s, q_row, h * dim, half)
            else:
                _rotate_head_bf16(row, h * dim, c, s, a_bits, b_bits, q_row, h * dim, half)
        slot = _cache_slot(slots, t, k_flat.shape[0])
        if slot < 0:
            continue                      # -1: a padding token, not stored (as in the reference)
        k_row, v_row = k_flat[slot], v_flat[slot]
        for h in range(num_kv_heads):
            at = (num_heads + h) * dim
            if lanes:
                _rotate_head_bf16_8(row, at, c, s, k_row, h * dim, half)
            else:
                _rotate_head_bf16(row, at, c, s, a_bits, b_bits, k_row, h * dim, half)
        v_row[:] = qkv[t, values:values + num_kv_heads * dim]


@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _rotate_store_parallel(qkv, num_heads, num_kv_heads, cos, sin, q_out, k_flat, v_flat, slots, threads):  # type: ignore[no-untyped-def]
    """_rotate_store over row ranges split across threads (a prefill chunk's rows; each row is
    computed and stored as alone: the same bits, and no two rows share a cache slot)."""
    _check_slots(slots, k_flat.shape[0])
    per = (qkv.shape[0] + threads - 1) // threads
    for i in prange(threads):
        _rotate_store(qkv, num_heads, num_kv_heads, cos, sin, q_out, k_flat, v_flat, slots,
                      i * per, min(qkv.shape[0], (i + 1) * per))


@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _rotate_store_bf16_parallel(qkv, num_heads, num_kv_heads, cos, sin, q_out, k_flat, v_flat, slots, threads):  # type: ignore[no-untyped-def]
    _check_slots(slots, k_flat.shape[0])
    per = (qkv.shape[0] + threads - 1) // threads
    for i in prange(threads):
        _rotate_store_bf16(qkv, num_heads, num_kv_heads, cos, sin, q_out, k_flat, v_flat, slots,
                           i * per, min(qkv.shape[0], (i + 1) * per))


def _fused_takes(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    return (qkv.dtype == k_cache.dtype == v_cache.dtype
            and qkv.dtype in (torch.float32, torch.bfloat16)
            and cos.dtype == sin.dtype == torch.float32 and qkv.dim() == 2 and qkv.is_contiguous() and cos.is_contiguous()
            and sin.is_contiguous() and cos.shape == sin.shape == (qkv.shape[0], k_cache.shape[3])
            and k_cache.is_contiguous() and v_cache.is_contiguous() and not qkv.is_cuda
            and slot_mapping.dtype == torch.long and slot_mapping.shape == qkv.shape[:1]
            and not qkv.requires_grad and not use_triton(qkv))   # Triton: its rotary + store


def warm_up() -> None:
    """Compile the numba path for the strided views the model passes (or load it from cache)."""
    for tokens in (1, 2):      # one token's views are contiguous to numba, more tokens' strided
        qkv = torch.ones(tokens, 3, 4)
        _rotary_cpu(qkv[:, :2], qkv[:, 2:], torch.ones(tokens, 4), torch.ones(tokens, 4))
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, PARALLEL_ROWS):
            cache = torch.zeros(PARALLEL_ROWS, 2, 1, 4, dtype=dtype)
            rotate_and_store(torch.ones(rows, 12, dtype=dtype), 1, 1, torch.ones(rows, 4),
                             torch.ones(rows, 4), cache, cache.clone(),
                             torch.arange(rows, dtype=torch.long))


# --- Triton kernel ----------------------------------------------------------------------------

@jit
def _rotary_kernel(out_ptr, x_ptr, cos_ptr, sin_ptr, num_heads, x_stride_t, x_stride_h,
                   cos_stride, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # grid: (num_tokens,); every head of one token, [BLOCK_H, HALF] per half. Products and sums
    # are rounded to x's dtype where the reference's elementwise ops round; the arithmetic
    # itself runs in fp32 (Triton's interpreter cannot do bf16 arithmetic directly).
    dtype = x_ptr.dtype.element_ty
    t = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF)
    ok = (heads < num_heads)[:, None]
    x_off = t * x_stride_t + heads[:, None] * x_stride_h + dims[None, :]
    x1 = tl.load(x_ptr + x_off, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + HALF, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * cos_stride + dims).to(dtype).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * cos_stride + HALF + dims).to(dtype).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * cos_stride + dims).to(dtype).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * cos_stride + HALF + dims).to(dtype).to(tl.float32)[None, :]
    o1 = (x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)
    o2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    o_off = t * num_heads * 2 * HALF + heads[:, None] * 2 * HALF + dims[None, :]
    tl.store(out_ptr + o_off, o1.to(dtype), mask=ok)
    tl.store(out_ptr + o_off + HALF, o2.to(dtype), mask=ok)


def _rotate_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    num_tokens, num_heads, head_dim = x.shape
    half = head_dim // 2
    assert x.stride(2) == 1 and head_dim % 2 == 0 and half & (half - 1) == 0
    assert cos.shape == sin.shape == (num_tokens, head_dim) and cos.stride() == sin.stride()
    assert cos.stride(1) == 1 and cos.dtype == sin.dtype
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=x.dtype, device=x.device)
    if num_tokens:
        _rotary_kernel[(num_tokens,)](out, x, cos, sin, num_heads, x.stride(0), x.stride(1),
                                      cos.stride(0), HALF=half,
                                      BLOCK_H=triton.next_power_of_2(num_heads))
    return out


# --- public -----------------------------------------------------------------------------------

def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, h, d], k [T, kvh, d]; cos/sin [T, d] for each token's position."""
    if use_triton(q):
        return _rotate_triton(q, cos, sin), _rotate_triton(k, cos, sin)
    return _rotary_cpu(q, k, cos, sin)


def rotate_and_store(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor,
                     sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> torch.Tensor:
    """The qkv projection's output [T, (h + 2 kvh) * d] -> rotated q [T, h, d]; the rotated keys
    and the values go into the cache at slot_mapping (kernels.kv_store.store_kvcache).

    fp32 or bf16 on the CPU: one numba call reading qkv in place, instead of a rotary call, a
    store call and a key tensor in between (the same arithmetic and roundings, so the same bits;
    a test checks)."""
    head_dim = k_cache.shape[3]
    fused = _fused_takes(qkv, cos, sin, k_cache, v_cache, slot_mapping)     # once: 30 calls a step
    if fused and qkv.dtype != torch.float32:
        q = torch.empty(qkv.shape[0], num_heads * head_dim, dtype=qkv.dtype)
        bits = lambda t: t.view(torch.int16).numpy()  # noqa: E731
        split_rows(_rotate_store_bf16, _rotate_store_bf16_parallel, qkv.shape[0],
                   bits(qkv), num_heads, num_kv_heads, cos.numpy(), sin.numpy(), bits(q),
                   bits(k_cache.view(-1, num_kv_heads * head_dim)),
                   bits(v_cache.view(-1, num_kv_heads * head_dim)), slot_mapping.numpy())
        return q.view(-1, num_heads, head_dim)
    if fused:
        q = torch.empty(qkv.shape[0], num_heads * head_dim)
        split_rows(_rotate_store, _rotate_store_parallel, qkv.shape[0],
                   qkv.numpy(), num_heads, num_kv_heads, cos.numpy(), sin.numpy(), q.numpy(),
                   k_cache.view(-1, num_kv_heads * head_dim).numpy(),
                   v_cache.view(-1, num_kv_heads * head_dim).numpy(), slot_mapping.numpy())
        return q.view(-1, num_heads, head_dim)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    q, k = apply_rotary(q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim),
                        cos, sin)
    store_kvcache(k, v.view(-1, num_kv_heads, head_dim), k_cache, v_cache, slot_mapping)
    return q
