"""RMSNorm with an optional fused residual add."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.backend import jit, use_triton


# --- torch reference (the spec) ---------------------------------------------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Computed in fp32 and cast back before the weight, as transformers' LlamaRMSNorm does."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


# --- fast CPU path ----------------------------------------------------------------------------

def _rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    # torch's fused rms_norm: one pass instead of four. Same values as the reference: in fp32 it
    # equals it bit for bit here; in other dtypes the weight is applied after the cast back.
    if residual is not None:
        x = x + residual
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps), x
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype), x


# --- Triton kernel ----------------------------------------------------------------------------

@jit
def _rms_norm_kernel(out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr, eps, hidden,
                     x_stride, residual_stride, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    # grid: (num_tokens,); one row per program, the whole hidden size in one block. Arithmetic
    # runs in fp32 with explicit roundings to the tensors' dtype where the reference rounds
    # (Triton's interpreter cannot do bf16 arithmetic directly; compiled, this costs nothing).
    dtype = x_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < hidden
    x = tl.load(x_ptr + row * x_stride + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_stride + offs, mask=ok, other=0.0)
        x = (x + r.to(tl.float32)).to(dtype).to(tl.float32)
        tl.store(residual_out_ptr + row * hidden + offs, x.to(dtype), mask=ok)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / hidden + eps)
    w = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    out = w * (x * rstd).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * hidden + offs, out.to(dtype), mask=ok)


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, hidden = x.shape
    assert x.stride(1) == 1 and weight.shape == (hidden,) and weight.is_contiguous()
    assert weight.dtype == x.dtype, "weight and activations must share a dtype"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(out) if residual is not None else x
    if num_tokens:
        _rms_norm_kernel[(num_tokens,)](
            out, new_residual, x, residual if residual is not None else x, weight, eps, hidden,
            x.stride(0), residual.stride(0) if residual is not None else 0,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden))
    return out, new_residual


# --- public -----------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (norm(x + residual) * weight, x + residual); x [num_tokens, hidden]."""
    if use_triton(x) and x.dim() == 2 and weight.dtype == x.dtype:
        return _rms_norm_triton(x, weight, eps, residual)
    return _rms_norm_cpu(x, weight, eps, residual)
