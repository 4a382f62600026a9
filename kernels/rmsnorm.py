"""RMSNorm with an optional fused residual add."""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from kernels.backend import PARALLEL_ROWS, jit, split_rows, tl, triton, use_triton
from kernels.bf16_bits import narrow, round_in_place, widen


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
# fp32: one numba call per norm: residual add, sum of squares, scale, instead of the add and
# torch's F.rms_norm, a composite on the CPU (pow, mean, add, rsqrt, mul, mul); 61 calls a step.
# Timings: kernels_bench --only norm (docs/BENCHMARKS.md).
#
# The result equals the reference bit for bit, because the sum of squares is added in the order
# torch's CPU sum uses for a contiguous row: `lanes`-wide vectors, four vector accumulators,
# folded through four cascade levels, then the leftover vectors, the accumulators, the leftover
# elements and the lanes one by one. The lane count follows torch's vector width, so
# `_torch_lanes` finds it by comparing against torch once; if no width matches (another torch
# build), the numba path stays off. Any other order moved logprobs of the tiny test model by
# ~1e-5.
# Rows are independent and each runs the same loop, so the result does not depend on the batch
# (kernels.invariant relies on that), nor on how a prefill chunk's rows are split across threads
# (kernels.backend.split_rows).

_ILP, _LEVELS = 4, 4      # torch's vector accumulators and cascade levels


@njit(nogil=True, boundscheck=False, cache=True)
def _sum_squares(row, lanes, acc):  # type: ignore[no-untyped-def]
    """sum(row ** 2) in fp32, in torch's order (above). acc: [_LEVELS, _ILP * lanes] scratch,
    each level's _ILP vector accumulators side by side (lane-wise loops over them vectorize
    without changing any lane's order)."""
    n = row.shape[0]
    if n < lanes:
        lanes = 1                        # torch sums a row shorter than a vector as scalars
    width = _ILP * lanes
    num_vecs = n // lanes
    groups = num_vecs // _ILP            # groups of _ILP vectors
    power = 0
    while (1 << power) < groups:
        power += 1
    power = max(4, power // _LEVELS)
    step = 1 << power
    acc[:] = 0
    first = acc[0]
    i = 0
    while i < groups:
        full = i + step <= groups
        for _ in range(step if full else groups - i):
            chunk = row[i * width:(i + 1) * width]
            for e in range(width):
                first[e] += chunk[e] * chunk[e]
            i += 1
        if not full:
            break
        for j in range(1, _LEVELS):      # carry a finished level up
            lower, upper = acc[j - 1], acc[j]
            for e in range(width):
                upper[e] += lower[e]
                lower[e] = 0
            if i & ((step - 1) << (j * power)):
                break
    for j in range(1, _LEVELS):
        level = acc[j]
        for e in range(width):
            first[e] += level[e]
    for vec in range(groups * _ILP, num_vecs):
        for lane in range(lanes):
            v = row[vec * lanes + lane]
            first[lane] += v * v
    for k in range(1, _ILP):
        for lane in range(lanes):
            first[lane] += first[k * lanes + lane]
    total = np.float32(0.0)
    for e in range(num_vecs * lanes, n):
        total += row[e] * row[e]
    for lane in range(lanes):
        total += first[lane]
    return total


@njit(nogil=True, boundscheck=False, cache=True)
def _norm_rows(x, residual, weight, eps, lanes, out, summed, t0, t1):  # type: ignore[no-untyped-def]
    """Rows t0 .. t1 - 1: out = weight * (h / sqrt(mean(h ** 2) + eps)), h = x + residual
    (stored in summed); residual None: h = x."""
    hidden = x.shape[1]
    acc = np.empty((_LEVELS, _ILP * lanes), np.float32)
    for t in range(t0, t1):
        h = x[t]
        if residual is not None:
            r, h = residual[t], summed[t]
            a = x[t]
            for i in range(hidden):
                h[i] = a[i] + r[i]
        mean = _sum_squares(h, lanes, acc) / np.float32(hidden)
        inv = np.float32(1.0) / np.sqrt(mean + eps)
        o = out[t]
        for i in range(hidden):
            o[i] = weight[i] * (h[i] * inv)


@njit(nogil=True, boundscheck=False, cache=True)
def _norm_rows_bf16(x, residual, weight, eps, lanes, out, summed, t0, t1):  # type: ignore[no-untyped-def]
    """_norm_rows for a bf16 body, on int16 bits (kernels/bf16_bits.py), rounding where the
    reference's bf16 ops round: the residual add, the cast back, the weight's product. The
    squares are summed in fp32 in _sum_squares' order, as the reference sums h.float()."""
    hidden = x.shape[1]
    acc = np.empty((_LEVELS, _ILP * lanes), np.float32)
    h_bits, t_bits = np.empty(hidden, np.uint32), np.empty(hidden, np.uint32)
    w_bits = np.empty(hidden, np.uint32)
    h, tmp, w = h_bits.view(np.float32), t_bits.view(np.float32), w_bits.view(np.float32)
    widen(weight, w_bits)
    for t in range(t0, t1):
        widen(x[t], h_bits)
        if residual is not None:
            widen(residual[t], t_bits)
            for i in range(hidden):
                h[i] += tmp[i]
            round_in_place(h_bits)
            narrow(h_bits, summed[t])
        mean = _sum_squares(h, lanes, acc) / np.float32(hidden)
        inv = np.float32(1.0) / np.sqrt(mean + eps)
        for i in range(hidden):
            tmp[i] = h[i] * inv
        round_in_place(t_bits)
        for i in range(hidden):
            tmp[i] = w[i] * tmp[i]
        narrow(t_bits, out[t])


def _numba_takes(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    return (x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and x.dim() == 2 and x.is_contiguous() and weight.is_contiguous()
            and weight.shape == x.shape[1:] and not x.requires_grad and not weight.requires_grad
            and (residual is None or (residual.dtype == x.dtype and residual.is_contiguous()
                                      and residual.shape == x.shape and not residual.requires_grad)))


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy()


@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _norm_rows_parallel(x, residual, weight, eps, lanes, out, summed, threads):  # type: ignore[no-untyped-def]
    """_norm_rows over row ranges split across threads (each row as alone: the same bits)."""
    per = (x.shape[0] + threads - 1) // threads
    for i in prange(threads):
        _norm_rows(x, residual, weight, eps, lanes, out, summed, i * per,
                   min(x.shape[0], (i + 1) * per))


@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _norm_rows_bf16_parallel(x, residual, weight, eps, lanes, out, summed, threads):  # type: ignore[no-untyped-def]
    per = (x.shape[0] + threads - 1) // threads
    for i in prange(threads):
        _norm_rows_bf16(x, residual, weight, eps, lanes, out, summed, i * per,
                        min(x.shape[0], (i + 1) * per))


def _norm_numba(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                lanes: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    if x.dtype == torch.bfloat16:
        args = (_bits(x), None if residual is None else _bits(residual), _bits(weight),
                np.float32(eps), lanes, _bits(out), _bits(summed))
        serial, parallel = _norm_rows_bf16, _norm_rows_bf16_parallel
    else:
        args = (x.numpy(), None if residual is None else residual.numpy(), weight.numpy(),
                np.float32(eps), lanes, out.numpy(), summed.numpy())
        serial, parallel = _norm_rows, _norm_rows_parallel
    split_rows(serial, parallel, x.shape[0], *args)
    return out, summed


@functools.cache
def _torch_lanes() -> int:
    """The lane count at which the numba path equals the reference bit for bit here; 0: none."""
    g = torch.Generator().manual_seed(0)
    for lanes in (8, 16, 4):
        ok = True
        for hidden in (1, 7, 64, 576, 1000, 4096):
            x = torch.randn(5, hidden, generator=g) * 3
            r, w = torch.randn(5, hidden, generator=g), torch.randn(hidden, generator=g)
            got, want = _norm_numba(x, w, 1e-5, r, lanes), rms_norm_ref(x, w, 1e-5, r)
            ok = ok and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if ok:
            return lanes
    return 0


def _rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if _numba_takes(x, weight, residual) and _torch_lanes():
        return _norm_numba(x, weight, eps, residual, _torch_lanes())
    if residual is not None:
        x = x + residual
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps), x
    # In other dtypes the weight is applied after the cast back, as in the reference.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype), x


def warm_up() -> None:
    """Compile the numba paths now (or load them from numba's on-disk cache)."""
    lanes = _torch_lanes()   # compiles the fp32 variants (with and without residual) as it checks
    if lanes:
        for rows in (1, PARALLEL_ROWS):      # the serial kernels and their parallel drivers
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.ones(rows, 8, dtype=dtype)
                for residual in (x, None):
                    _norm_numba(x, x[0], 1e-5, residual, lanes)



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
