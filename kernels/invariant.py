"""Batch-invariant ops for deterministic mode, invariant by construction.

A row's result must not depend on which other rows share the step, how many there are, the
row's place among them, or the CPU's vector width. No library kernel promises that: MKL and
oneDNN pick kernels and blockings by row count and by instruction set, and torch's elementwise
loops send a tensor's last few elements through scalar libm calls, so an element's exp can
round differently at another batch size. So every op with a reduction runs through code of ours
whose order of operations is written in the source, per output element:

- linear (every layer and the lm_head): the panel GEMM of kernels.linear, always, on fp32
  values (a bf16 body's weights widen exactly; the product is rounded to bf16 once). Each
  output element sums its input features in the same chunks of 256, in order, with one fused
  multiply-add a step, whatever the row count; a missing row of a 4-row block is computed from
  a copy of another row and never stored; threads split output columns, never the sum.
- rms_norm: the sum of squares in eight fixed lanes (not torch's width), then lane by lane.
- silu(gate) * up: exp8 (kernels.simd) for every element, vector or tail alike.
- attention: every query row (decode, prefill chunk or grammar-forced) on its own over its own
  keys, in 128-key spans combined in order; compiled without fastmath, so no reassociation:
  dot products in eight fixed partial sums.
- log_softmax, softmax, exp, cumsum over the vocabulary (the sampler): per row, fixed lanes.

numba compiles for the CPU it runs on; without fastmath LLVM may vectorize only what keeps
each lane's order (IEEE semantics), so the bits follow the source. What is left to the CPU:
`llvm.fmuladd` is one fused operation on CPUs with FMA (every x86-64 CPU since 2013) and two
roundings on the few without; `log` is libm's, in float64, rounded to float32.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from kernels.backend import numba_threads
from kernels.decode_cpu import SPAN_KEYS, _items
from kernels.linear import PANEL, LinearWeight, pack_panels, panel_gemm
from kernels.metadata import AttentionMetadata, row_view
from kernels.rmsnorm import _norm_rows
from kernels.simd import (WIDTH, add8, as_f32, broadcast8, div8, exp8, exp_sum, lane8, load8,
                          mul8, row_max, store8, sub8, zeros8)

NORM_LANES = 8          # rms_norm's sum of squares: eight lanes on every CPU

# What server_info reports: the kernel each op runs in deterministic mode.
KERNELS = {
    "linear": "panel_gemm_fp32 (K in chunks of 256, in order)",
    "lm_head": "panel_gemm_fp32 (K in chunks of 256, in order)",
    "rms_norm": f"rms_norm_rows ({NORM_LANES} fixed lanes)",
    "silu_mul": "silu_mul_rows (exp8)",
    "attention": "attend_rows_exact (per row, 128-key spans, no fastmath)",
    "sampler": "log_softmax / softmax / exp / cumsum per row (exp8, fixed lanes)",
}


# --- linear -----------------------------------------------------------------------------------

def prepare_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> LinearWeight:
    """The weight [out, in] as fp32 panels, out padded with zero rows to a multiple of PANEL
    (the padded columns are computed and dropped); no plain copy is kept."""
    out_features = weight.shape[0]
    values = weight.float()
    if out_features % PANEL:
        values = torch.cat([values, values.new_zeros(-out_features % PANEL, values.shape[1])])
    panels = pack_panels(values)
    meta = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
    return LinearWeight(meta, bias, None, panels, panels.view(-1).numpy())


def linear(x: torch.Tensor, layer: LinearWeight) -> torch.Tensor:
    """x [T, in] -> [T, out] in x's dtype, computed in fp32 and rounded once."""
    assert layer.panels is not None, "prepare the layer with invariant.prepare_linear"
    out_features, in_features = layer.shape
    out = panel_gemm(x.reshape(-1, in_features).float(), layer.panels, None, layer.panel_data)
    if out.shape[1] != out_features:
        out = out[:, :out_features].contiguous()
    if layer.bias is not None:
        out.add_(layer.bias.float())
    return out.to(x.dtype)


# --- rms_norm ---------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like kernels.rms_norm: (norm(x + residual) * weight, x + residual), x [T, hidden].

    In bf16 the sum x + residual is rounded to bf16 first, and the weight applied after the
    normed value is, as transformers does; both are elementwise and exact to reproduce."""
    if residual is not None:
        x = x + residual                      # elementwise: the same bits at any batch size
    h = x.float().contiguous()
    w = weight.float().contiguous() if x.dtype == torch.float32 else torch.ones(h.shape[1])
    out = torch.empty_like(h)
    _norm_rows(h.numpy(), None, w.numpy(), np.float32(eps), NORM_LANES, out.numpy(), h.numpy(),
               0, h.shape[0])
    if x.dtype == torch.float32:
        return out, x
    return weight * out.to(x.dtype), x


# --- silu(gate) * up --------------------------------------------------------------------------

@njit(nogil=True, boundscheck=False, inline="always")
def _exp1(v):  # type: ignore[no-untyped-def]
    """exp8 on a splat, lane 0: a lone value gets the same arithmetic as a vector lane."""
    return lane8(exp8(broadcast8(v)), 0)


@njit(nogil=True, boundscheck=False, cache=True)
def _silu_one(g):  # type: ignore[no-untyped-def]
    return g / (np.float32(1.0) + _exp1(-g))


@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _silu_mul_rows(gate_up, out):  # type: ignore[no-untyped-def]
    rows, width = out.shape
    one = broadcast8(np.float32(1.0))
    for t in prange(rows):
        gu, o = gate_up[t], out[t]               # gate: gu[:width], up: gu[width:]
        i = 0
        while i + WIDTH <= width:
            g = load8(gu, i)
            silu = div8(g, add8(one, exp8(sub8(zeros8(), g))))
            store8(o, i, mul8(silu, load8(gu, width + i)))
            i += WIDTH
        for j in range(i, width):
            o[j] = _silu_one(gu[j]) * gu[width + j]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * inter] -> silu(gate) * up [T, inter], in gate_up's dtype."""
    x = gate_up.float().contiguous()
    out = torch.empty(x.shape[0], x.shape[1] // 2)
    if x.shape[0]:
        numba_threads()
        _silu_mul_rows(x.numpy(), out.numpy())
    return out.to(gate_up.dtype)


def gate_up_silu(x: torch.Tensor, layer: LinearWeight) -> torch.Tensor:
    """kernels.linear.gate_up_silu's batch-invariant form: the product, then silu_mul."""
    return silu_mul(linear(x, layer))


# --- attention --------------------------------------------------------------------------------

@njit(nogil=True, boundscheck=False, inline="always")
def _dot(a, b, n):  # type: ignore[no-untyped-def]
    """sum(a[:n] * b[:n]) in eight partial sums (element x to sum x % 8), added as a tree, then
    the tail: independent chains LLVM can put in one vector without reordering any of them."""
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = np.float32(0.0)
    x = 0
    while x + 8 <= n:
        p0 += a[x] * as_f32(b[x])
        p1 += a[x + 1] * as_f32(b[x + 1])
        p2 += a[x + 2] * as_f32(b[x + 2])
        p3 += a[x + 3] * as_f32(b[x + 3])
        p4 += a[x + 4] * as_f32(b[x + 4])
        p5 += a[x + 5] * as_f32(b[x + 5])
        p6 += a[x + 6] * as_f32(b[x + 6])
        p7 += a[x + 7] * as_f32(b[x + 7])
        x += 8
    s = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))
    for i in range(x, n):
        s += a[i] * as_f32(b[i])
    return s


@njit(nogil=True, boundscheck=False, cache=True)
def _attend_span(q, k_cache, v_cache, table, b0, b1, seq_len, scale, scores, acc, ml):  # type: ignore[no-untyped-def]
    """kernels.attention's span item (same arguments, same outputs), in source order: scores
    by _dot, the span's max and exp8 sum, then acc = sum over keys in order of weight * value."""
    num_kv_heads, group, head_dim = q.shape
    bs = k_cache.shape[1]
    n = min(b1 * bs, seq_len) - b0 * bs
    for b in range(b0, b1):
        blk = k_cache[table[b]]                                  # [bs, kvh, d]
        for o in range(min(bs, seq_len - b * bs)):
            for h in range(num_kv_heads):
                for g in range(group):
                    scores[h, g, (b - b0) * bs + o] = _dot(q[h, g], blk[o, h], head_dim) * scale
    for h in range(num_kv_heads):
        for g in range(group):
            row = scores[h, g, :n]
            m = row_max(row)
            ml[h, g, 0] = m
            ml[h, g, 1] = exp_sum(row, m, row)
    acc[:] = 0
    for b in range(b0, b1):
        blk = v_cache[table[b]]
        for o in range(min(bs, seq_len - b * bs)):
            for h in range(num_kv_heads):
                for g in range(group):
                    w = scores[h, g, (b - b0) * bs + o]
                    a, v = acc[h, g], blk[o, h]
                    for x in range(head_dim):
                        a[x] += w * as_f32(v[x])


@njit(nogil=True, boundscheck=False, cache=True)
def _combine(acc, ml, i0, i1, out):  # type: ignore[no-untyped-def]
    """A row's items i0 .. i1 - 1, rescaled to the row's max and added in item order."""
    num_kv_heads, group, head_dim = out.shape
    for h in range(num_kv_heads):
        for g in range(group):
            m = ml[i0, h, g, 0]
            for i in range(i0 + 1, i1):
                m = max(m, ml[i, h, g, 0])
            total = np.float32(0.0)
            for i in range(i0, i1):
                total += ml[i, h, g, 1] * _exp1(ml[i, h, g, 0] - m)
            inv = np.float32(1.0) / total
            o = out[h, g]
            o[:] = 0
            for i in range(i0, i1):
                w = _exp1(ml[i, h, g, 0] - m) * inv
                a = acc[i, h, g]
                for x in range(head_dim):
                    o[x] += w * a[x]


@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _attend_rows(q, k_cache, v_cache, tables, lens, scale, span_blocks, out):  # type: ignore[no-untyped-def]
    bs = k_cache.shape[1]
    starts, row_of, b0 = _items(lens, bs, span_blocks)
    num_items = row_of.shape[0]
    acc = np.empty((num_items, q.shape[1], q.shape[2], q.shape[3]), np.float32)
    ml = np.empty((num_items, q.shape[1], q.shape[2], 2), np.float32)
    span = (span_blocks * bs + WIDTH - 1) // WIDTH * WIDTH
    for i in prange(num_items):              # items split across threads; each writes its own
        r = row_of[i]
        scores = np.empty((q.shape[1], q.shape[2], span), np.float32)
        _attend_span(q[r], k_cache, v_cache, tables[r], b0[i], b0[i] + span_blocks, lens[r],
                     scale, scores, acc[i], ml[i])
    for r in prange(lens.shape[0]):
        _combine(acc, ml, starts[r], starts[r + 1], out[r])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Like kernels.paged_attention, q [T, h, d] -> [T, h, d]: every query row attends to the
    keys up to its own position, on its own. fp32 or bf16 caches on the CPU only."""
    if q.is_cuda or k_cache.dtype not in (torch.float32, torch.bfloat16) or not (
            k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("deterministic mode runs attention on the CPU, fp32 or bf16 caches only")
    bs = k_cache.shape[1]
    meta = row_view(meta)                                       # once per step, not per layer
    assert meta.row_tables is not None and meta.row_lens is not None
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    qd = q.reshape(rows, num_kv_heads, num_heads // num_kv_heads, head_dim).float().contiguous()
    out = torch.empty_like(qd)
    if k_cache.dtype == torch.bfloat16:
        kc, vc = k_cache.view(torch.int16).numpy(), v_cache.view(torch.int16).numpy()
    else:
        kc, vc = k_cache.numpy(), v_cache.numpy()
    if rows:
        numba_threads()
        _attend_rows(qd.numpy(), kc, vc, meta.row_tables.numpy(), meta.row_lens.numpy(),
                     np.float32(scale), max(1, SPAN_KEYS // bs), out.numpy())
    return out.view(rows, num_heads, head_dim).to(q.dtype)


# --- reductions over the vocabulary (the sampler) ----------------------------------------------

@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _log_softmax_rows(x, out):  # type: ignore[no-untyped-def]
    for r in prange(x.shape[0]):
        row, o = x[r], out[r]
        m = row_max(row)
        log_total = np.float32(math.log(np.float64(exp_sum(row, m, o))))
        for i in range(row.shape[0]):
            o[i] = (row[i] - m) - log_total          # torch's order: (x - max) - log(sum)


@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _softmax_rows(x, out):  # type: ignore[no-untyped-def]
    for r in prange(x.shape[0]):
        row, o = x[r], out[r]
        inv = np.float32(1.0) / exp_sum(row, row_max(row), o)
        for i in range(row.shape[0]):
            o[i] *= inv


@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _exp_rows(x, out):  # type: ignore[no-untyped-def]
    for r in prange(x.shape[0]):
        exp_sum(x[r], np.float32(0.0), out[r])


@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _cumsum_rows(x, out):  # type: ignore[no-untyped-def]
    for r in prange(x.shape[0]):
        total = 0.0                                  # float64, as torch accumulates
        row, o = x[r], out[r]
        for i in range(row.shape[0]):
            total += row[i]
            o[i] = total


def _rowwise(kernel, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Run a row kernel over x [..., V] (fp32) -> the same shape."""
    assert x.dtype == torch.float32, "the vocabulary reductions run in fp32"
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(rows)
    if rows.numel():
        numba_threads()
        kernel(rows.numpy(), out.numpy())
    return out.view(x.shape)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension."""
    return _rowwise(_log_softmax_rows, x)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension."""
    return _rowwise(_softmax_rows, x)


def exp(x: torch.Tensor) -> torch.Tensor:
    """exp, element by element (exp8 for every element, tail or not)."""
    return _rowwise(_exp_rows, x)


def cumsum(x: torch.Tensor) -> torch.Tensor:
    """Running sum over the last dimension, accumulated in float64 in order."""
    return _rowwise(_cumsum_rows, x)
