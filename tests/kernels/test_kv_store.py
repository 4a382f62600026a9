from __future__ import annotations

import pytest
import torch

from kernels import store_kvcache
from kernels.kv_store import _store_kvcache_triton, store_kvcache_ref


def kv_case(dtype: torch.dtype, strided: bool):
    g = torch.Generator().manual_seed(1)
    kc = torch.zeros(4, 16, 3, 64, dtype=dtype)
    vc = torch.zeros_like(kc)
    qkv = torch.randn(6, 9, 64, generator=g).to(dtype)            # v as a strided view, as in the model
    key = qkv[:, 3:6] if strided else qkv[:, 3:6].contiguous()
    value = qkv[:, 6:9]
    slots = torch.tensor([0, 15, 16, 17, 63, 40])
    return key, value, kc, vc, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kvcache_cpu_matches_reference(dtype: torch.dtype) -> None:
    key, value, kc, vc, slots = kv_case(dtype, strided=True)
    kr, vr = kc.clone(), vc.clone()
    store_kvcache_ref(key, value, kr, vr, slots)
    store_kvcache(key, value, kc, vc, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


def test_store_kvcache_cpu_skips_padding_and_refuses_slots_past_the_cache() -> None:
    key, value, kc, vc, slots = kv_case(torch.float32, strided=True)
    slots[2] = -1                                                   # padding: not stored
    kr, vr = kc.clone(), vc.clone()
    store_kvcache_ref(key, value, kr, vr, slots)
    store_kvcache(key, value, kc, vc, slots)                        # the numba path (fp32)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    slots[2] = kc.shape[0] * kc.shape[1]                            # one past the last slot
    with pytest.raises(IndexError):
        store_kvcache(key, value, kc, vc, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kvcache_triton_matches_reference(interpret: None, dtype: torch.dtype) -> None:
    key, value, kc, vc, slots = kv_case(dtype, strided=True)
    slots[2] = -1                                                   # padding: not stored
    kr, vr = kc.clone(), vc.clone()
    store_kvcache_ref(key, value, kr, vr, slots)
    store_kvcache(key, value, kc, vc, slots)                       # Triton under the fixture
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.cuda
def test_store_kvcache_cuda(cuda: torch.device) -> None:
    key, value, kc, vc, slots = kv_case(torch.bfloat16, strided=True)
    kr, vr = kc.clone(), vc.clone()
    store_kvcache_ref(key, value, kr, vr, slots)
    kc, vc = kc.to(cuda), vc.to(cuda)
    _store_kvcache_triton(key.to(cuda), value.to(cuda), kc, vc, slots.to(cuda))
    assert torch.equal(kc.cpu(), kr) and torch.equal(vc.cpu(), vr)
