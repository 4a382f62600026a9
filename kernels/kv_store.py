"""KV cache store: this step's keys and values written into the paged cache at slot_mapping.

Cache layout as in kernels.metadata; slot -1 marks a padding token, not stored.
"""
from __future__ import annotations

import torch
from numba import njit

from kernels.backend import jit, tl, triton, use_triton


# --- torch reference (the spec) ---------------------------------------------------------------

def store_kvcache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] at slot_mapping, one token at a time."""
    bs = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:                                  # -1: a padding token, not stored
            k_cache[slot // bs, slot % bs] = key[t]
            v_cache[slot // bs, slot % bs] = value[t]


# --- fast CPU path ----------------------------------------------------------------------------

@njit(nogil=True, boundscheck=False, cache=True)
def _store_rows(key, value, k_flat, v_flat, slots):  # type: ignore[no-untyped-def]
    num_slots = k_flat.shape[0]
    for t in range(slots.shape[0]):
        slot = slots[t]
        if slot < 0:
            continue                      # -1: a padding token, not stored (as in the reference)
        if slot >= num_slots:
            raise IndexError("slot_mapping points outside the KV cache")
        k_flat[slot] = key[t]
        v_flat[slot] = value[t]


def _store_kvcache_cpu(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    if (key.dtype == value.dtype == k_cache.dtype == v_cache.dtype == torch.float32
            and slot_mapping.dtype == torch.long and value.shape == key.shape
            and slot_mapping.shape == key.shape[:1]):
        # One numba call instead of two index_copy_ (kernels_bench --only store); the keys and
        # values may be the strided slices of the qkv output.
        _store_rows(key.numpy(), value.numpy(), k_flat.numpy(), v_flat.numpy(),
                    slot_mapping.numpy())
        return
    k_flat.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_flat.index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def warm_up() -> None:
    """Compile the numba store now (or load it from numba's on-disk cache)."""
    kc = torch.zeros(1, 16, 1, 4)
    for tokens in (1, 2):      # one token's slices are contiguous to numba, more tokens' strided
        kv = torch.ones(tokens, 2, 4)
        _store_kvcache_cpu(kv[:, :1], kv[:, 1:], kc, kc.clone(), torch.arange(tokens))


# --- Triton kernel ----------------------------------------------------------------------------

@jit
def _store_kvcache_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                          key_stride, value_stride, ROW: tl.constexpr, BLOCK: tl.constexpr):
    # grid: (num_tokens,); a token's kv heads are ROW = num_kv_heads * head_dim contiguous values,
    # and so is a cache slot.
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < ROW
    if slot >= 0:                                    # -1: a padding token, not stored
        k = tl.load(key_ptr + t * key_stride + offs, mask=ok)
        v = tl.load(value_ptr + t * value_stride + offs, mask=ok)
        tl.store(k_cache_ptr + slot * ROW + offs, k, mask=ok)
        tl.store(v_cache_ptr + slot * ROW + offs, v, mask=ok)


def _store_kvcache_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    row = num_kv_heads * head_dim
    assert value.shape == key.shape and k_cache.shape == v_cache.shape
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), "cache heads/dim differ from key's"
    assert key.dtype == value.dtype == k_cache.dtype == v_cache.dtype, "no casts in the kernel"
    assert key.stride(1) == head_dim and key.stride(2) == 1, "a token's key must be contiguous"
    assert value.stride(1) == head_dim and value.stride(2) == 1, "a token's value must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert slot_mapping.numel() == num_tokens and slot_mapping.device == key.device
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](key, value, k_cache, v_cache, slot_mapping,
                                         key.stride(0), value.stride(0),
                                         ROW=row, BLOCK=triton.next_power_of_2(row))


# --- public -----------------------------------------------------------------------------------

def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the cache at slot_mapping."""
    if use_triton(key) and key.dtype == k_cache.dtype:
        _store_kvcache_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        _store_kvcache_cpu(key, value, k_cache, v_cache, slot_mapping)
