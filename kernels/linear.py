"""Linear layers: the weight as the fast path wants it, and one call that picks the path.

fp32 on the CPU. torch's `F.linear` calls MKL's sgemm on the plain [out, in] weight (on AMD CPUs
MKL takes a slow generic path); oneDNN on a weight reordered once into its blocked layout
("prepacked", what torch.compile's CPU freezing does) was faster for every SmolLM2 shape from
2 rows on. Our own panel GEMM (below) is faster again at decode sizes and about even at a
512-row prefill chunk (the lm_head is computed for sampled rows only, so decode sizes are what
it sees). So a weight whose out_features
divide into 24-column panels is packed into them; others fall back to oneDNN. (On a CPU with
AVX-512 oneDNN's fp32 product overtakes the panels' AVX2 vectors from some row count: the engine
measures that for the lm_head at load, `calibrate_panels`, and keeps both forms where it does.)
`benchmarks/kernels_bench.py --only linear` measures all three; docs/BENCHMARKS.md has the
figures. Deterministic mode packs every layer into panels (kernels.invariant pads out_features
to a multiple of PANEL); a packed fp32 layer drops its plain copy, which would hold as much
memory again.

The panel GEMM: the weight [out, in] is stored as panels of 24 output columns, each [in, 24]
contiguous, so a kernel step reads 24 consecutive weights of one input feature. A microkernel
computes 4 rows x 24 columns with twelve 8-float accumulators held in registers
(kernels.simd), broadcasting one input value against three weight vectors per step: 12 FMAs for
3 vector loads and 4 broadcasts, the shape of a BLIS microkernel. The input dimension is summed
in chunks of 256 (each chunk's panel slice, 24 KiB, stays in L1 across the row blocks; the
partial sums are added to the output between chunks, which also keeps rounding error closer to
a blocked BLAS than one long chain would). Panels are split across numba's threads.

bf16 body. Whether a bf16 matmul beats fp32 depends on the CPU (native bf16 dot products with
AVX512-BF16 or AMX, or none with AVX2 only), so it is measured, not assumed: `MIN_BF16_ROWS`
says from how many rows oneDNN's bf16 product (on the weight prepacked in bf16 where this CPU's
oneDNN computes bf16: `bf16_prepack`; F.linear on the plain bf16 weight took up to twice as
long at 1-32 rows) is used; the engine re-measures it with `calibrate` when it loads a bf16
body. Below the threshold a bf16 layer's products run on its panels, kept in bf16: with
AVX512-BF16, in the pair layout of kernels.dot_bf16 (its dot-product instruction; faster than
oneDNN at decode sizes on Zen 4); elsewhere through the panel GEMM in fp32, the microkernel
widening each weight exactly as it loads it (a decode step reads half the bytes of fp32 panels),
then rounded to bf16; oneDNN on an fp32 prepacked copy where the shape has no panels. Every
branch sums exact products of the same bf16 values in fp32: they differ in order only.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from kernels import dot_bf16
from kernels.backend import dot_bf16_linear, numba_threads, panel_linear, prepack_linear
from kernels.dot_bf16 import PANEL as DOT_PANEL
from kernels.dot_bf16 import dot_gemm, dot_silu, gate_up_order, pack_pairs
from kernels.dot_bf16 import flat as flat_pairs
from kernels.simd import add8, fma8, load8, splat8, store8, zeros8

# oneDNN picks its blocked layout for an expected row count. 32 was as fast as or faster than 1
# and 512 for 1-64 rows, and within noise for a 512-row prefill chunk.
PACK_ROWS_HINT = 32

# (in_features, out_features, the layer's small-product kernel: `below`) -> the smallest number
# of rows at which oneDNN's bf16 product is used: what kernels.calibrate measured when the
# engine loaded a bf16 body (keyed by kernel too, so two engines with different kernels in one
# process keep their own). Unmeasured shapes use the default, from kernels_bench --only body on
# Zen 4: the fp32 panels lost from 2-8 rows, the dot-product kernel won up to 16 rows.
MIN_BF16_ROWS: dict[tuple[int, int, str], int] = {}
DEFAULT_MIN_BF16_ROWS = {"fp32": 8, "dot": 32}

NEVER = 1 << 62     # a threshold no row count reaches (a shape that always runs in fp32; a layer
                    # whose fp32 branch always takes its panels)


@dataclass(slots=True)
class LinearWeight:
    """One layer's weight [out, in] (and bias) in the body's dtype, plus its fast-path form."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    packed: torch.Tensor | None = None     # the weight's values in fp32, oneDNN's blocked layout
    panels: torch.Tensor | None = None     # ... or in fp32 panels [out / PANEL, in, PANEL] (or both)
    panel_data: np.ndarray | None = None   # the panels' memory, flat, as the numba kernel takes it
    pairs: torch.Tensor | None = None      # a bf16 layer's panels for kernels.dot_bf16 (not `panels`)
    pairs_data: np.ndarray | None = None
    gated: bool = False                    # pairs in gate_up_order (prepare_gate_up)
    packed_bf16: torch.Tensor | None = None  # a bf16 layer's weight in oneDNN's layout, in bf16
    # A layer with panels and `packed` both (the lm_head where calibrate_panels found oneDNN
    # faster): from this many rows its fp32 branch runs oneDNN, below it the panels.
    onednn_rows: int = NEVER

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


def prepare_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> LinearWeight:
    """Wrap a weight for `apply_linear`, packing it for the fast CPU path where there is one:
    our panels where out_features is a multiple of PANEL, else oneDNN's prepacked layout.

    A bf16 weight is also prepacked in bf16 for its bf16 branch, where this CPU's oneDNN
    computes bf16. A weight whose every branch reads a packed form keeps no plain copy, which
    would hold as much memory again: what is left of it is a meta tensor (its shape and dtype,
    no data)."""
    packed = panels = packed_bf16 = pairs = None
    bf16 = weight.dtype == torch.bfloat16
    if (bf16 and not weight.is_cuda and dot_bf16_linear() and weight.shape[0] % DOT_PANEL == 0
            and weight.shape[1] % 2 == 0):
        pairs = pack_pairs(weight)
    elif not weight.is_cuda and panel_linear() and weight.shape[0] % PANEL == 0:
        panels = pack_panels(weight, weight.dtype if bf16 else None)
    elif not weight.is_cuda and prepack_linear():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.float().contiguous(), PACK_ROWS_HINT)
    if weight.dtype == torch.bfloat16 and not weight.is_cuda and bf16_prepack():
        packed_bf16 = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)
    below = packed is not None or panels is not None or pairs is not None
    if below and (weight.dtype == torch.float32 or packed_bf16 is not None):
        weight = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
    return LinearWeight(weight, bias, packed, panels, None if panels is None else _flat(panels),
                        pairs, None if pairs is None else flat_pairs(pairs), packed_bf16=packed_bf16)


@functools.cache
def bf16_prepack() -> bool:
    """Whether bf16 layers run through oneDNN on a weight prepacked in bf16: oneDNN prepacking is
    on (kernels.backend.prepack_linear) and a small bf16 product through it runs and comes out
    right here (torch's oneDNN bf16 linear checks the CPU's bf16 support; where it raises, bf16
    layers keep F.linear on the plain weight). Whether bf16 is worth it at all on this CPU is
    calibrate's question."""
    if not prepack_linear():
        return False
    try:
        w = torch.ones(PANEL, 16, dtype=torch.bfloat16)
        out = _onednn(torch.ones(2, 16, dtype=torch.bfloat16),
                      torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT), None)
    except RuntimeError:
        return False
    return bool((out == 16).all())


def _flat(panels: torch.Tensor) -> np.ndarray:
    """The panels' memory as the numba kernel takes it: fp32, or bf16 as its int16 bits."""
    flat = panels.view(-1)
    return (flat.view(torch.int16) if panels.dtype == torch.bfloat16 else flat).numpy()


def below(layer: LinearWeight) -> str:
    """Which kernel a bf16 layer's products below its crossover run: "dot" (kernels.dot_bf16)
    or "fp32" (the fp32 panels, or oneDNN's fp32 product)."""
    return "dot" if layer.pairs is not None else "fp32"


def use_bf16(num_rows: int, in_features: int, out_features: int, kernel: str = "fp32") -> bool:
    """Whether a [num_rows, in] x [out, in]^T product of a bf16 layer whose small products run
    `kernel` (`below`) should run oneDNN's bf16 product."""
    key = (in_features, out_features, kernel)
    return num_rows >= MIN_BF16_ROWS.get(key, DEFAULT_MIN_BF16_ROWS[kernel])


def _onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def apply_linear(x: torch.Tensor, layer: LinearWeight) -> torch.Tensor:
    """x [T, in] -> [T, out], in x's dtype (which is the layer's)."""
    if (layer.packed is None and layer.panels is None and layer.pairs is None) or x.is_cuda:
        return F.linear(x, layer.weight, layer.bias)
    if x.dtype == torch.float32:
        return _fp32_packed(x, layer, layer.bias)
    out_features, in_features = layer.shape
    if use_bf16(x.numel() // in_features, in_features, out_features, below(layer)):
        return linear_bf16(x, layer)
    return linear_below(x, layer)


def linear_below(x: torch.Tensor, layer: LinearWeight) -> torch.Tensor:
    """A bf16 layer's products below its bf16 crossover: x [T, in] bf16 -> bf16 [T, out]."""
    if layer.pairs is not None:
        return _on_pairs(x, layer, layer.bias, torch.bfloat16)
    return linear_fp32(x, layer).to(x.dtype)


def _on_pairs(x: torch.Tensor, layer: LinearWeight, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    assert layer.pairs is not None
    out = dot_gemm(x, layer.pairs, bias, layer.pairs_data, out_dtype)
    return out[:, _weight_order(out.shape[1])] if layer.gated else out


@functools.cache
def _weight_order(out_features: int) -> torch.Tensor:
    """Where each of the weight's rows sits in gate_up_order."""
    return torch.argsort(gate_up_order(out_features))


def prepare_gate_up(weight: torch.Tensor, bias: torch.Tensor | None = None) -> LinearWeight:
    """prepare_linear for a fused [gate; up] weight [2 I, in]. Where its small products run on
    kernels.dot_bf16 (and it has no bias), its panels alternate gate and up blocks so that
    `gate_up_silu` computes silu(gate) * up in the same call: one call and one pass over the
    [T, 2 I] product less per layer."""
    layer = prepare_linear(weight, bias)
    if layer.pairs is not None and bias is None and weight.shape[0] % (2 * DOT_PANEL) == 0:
        layer.pairs = pack_pairs(weight[gate_up_order(weight.shape[0])])
        layer.pairs_data, layer.gated = flat_pairs(layer.pairs), True
    return layer


def gate_up_silu(x: torch.Tensor, layer: LinearWeight) -> torch.Tensor:
    """silu(gate) * up of x [T, in] @ [gate; up]^T -> [T, I] in x's dtype."""
    out_features, in_features = layer.shape
    rows = x.numel() // in_features
    if layer.gated and x.dtype == torch.bfloat16 and not use_bf16(rows, in_features, out_features, "dot"):
        return dot_silu(x, layer.pairs, layer.pairs_data)
    return silu_mul(apply_linear(x, layer))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 I] -> silu(gate) * up [T, I] (torch's ops, in gate_up's dtype)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def linear_bf16(x: torch.Tensor, layer: LinearWeight) -> torch.Tensor:
    """The bf16 branch of a bf16 layer: x [T, in] bf16 -> bf16 [T, out], fp32 sums."""
    if layer.packed_bf16 is not None and not x.is_cuda:
        return _onednn(x, layer.packed_bf16, layer.bias)
    return F.linear(x, layer.weight, layer.bias)


def _fp32_packed(x: torch.Tensor, layer: LinearWeight, bias: torch.Tensor | None) -> torch.Tensor:
    if layer.panels is not None and (layer.packed is None
                                     or x.numel() // x.shape[-1] < layer.onednn_rows):
        return panel_gemm(x, layer.panels, bias, layer.panel_data)
    assert layer.packed is not None
    return _onednn(x, layer.packed, bias)


# --- panel GEMM (numba) -----------------------------------------------------------------------

PANEL = 24      # output columns per panel: three 8-float vectors
_ROWS = 4       # rows per microkernel call: 4 x 3 accumulators + 3 weights + 1 broadcast = 16 registers
_CHUNK = 256    # input features summed in registers before the partial sum goes to the output


def pack_panels(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[out, in] -> [out / PANEL, in, PANEL] in `dtype` (fp32 unless bf16 is asked for): panel
    p, row k holds W[24p : 24p + 24, k]."""
    out_features, in_features = weight.shape
    assert out_features % PANEL == 0, "out_features must be a multiple of PANEL"
    return (weight.to(dtype or torch.float32).reshape(out_features // PANEL, PANEL, in_features)
            .transpose(1, 2).contiguous())


@njit(nogil=True, boundscheck=False, cache=True)
def _microkernel(x, m0, rows, wp, base, k0, k1, out, n0, accumulate):  # type: ignore[no-untyped-def]
    """out[m0 : m0 + rows, n0 : n0 + 24] (+)= x[m0 : m0 + rows, k0:k1] @ panel slice; rows <= 4.

    wp is every panel flattened; the panel's row k starts at base + k * PANEL. Missing rows
    (rows < 4) repeat row m0: computed, never stored."""
    c00 = zeros8(); c01 = zeros8(); c02 = zeros8()      # noqa: E702 (a 4 x 3 register block)
    c10 = zeros8(); c11 = zeros8(); c12 = zeros8()      # noqa: E702
    c20 = zeros8(); c21 = zeros8(); c22 = zeros8()      # noqa: E702
    c30 = zeros8(); c31 = zeros8(); c32 = zeros8()      # noqa: E702
    x0 = x[m0]
    x1 = x[m0 + min(1, rows - 1)]
    x2 = x[m0 + min(2, rows - 1)]
    x3 = x[m0 + min(3, rows - 1)]
    for k in range(k0, k1):
        at = base + k * PANEL
        w0 = load8(wp, at); w1 = load8(wp, at + 8); w2 = load8(wp, at + 16)          # noqa: E702
        b = splat8(x0, k)
        c00 = fma8(b, w0, c00); c01 = fma8(b, w1, c01); c02 = fma8(b, w2, c02)       # noqa: E702
        b = splat8(x1, k)
        c10 = fma8(b, w0, c10); c11 = fma8(b, w1, c11); c12 = fma8(b, w2, c12)       # noqa: E702
        b = splat8(x2, k)
        c20 = fma8(b, w0, c20); c21 = fma8(b, w1, c21); c22 = fma8(b, w2, c22)       # noqa: E702
        b = splat8(x3, k)
        c30 = fma8(b, w0, c30); c31 = fma8(b, w1, c31); c32 = fma8(b, w2, c32)       # noqa: E702
    _put(out[m0], n0, c00, c01, c02, accumulate)
    if rows > 1:
        _put(out[m0 + 1], n0, c10, c11, c12, accumulate)
    if rows > 2:
        _put(out[m0 + 2], n0, c20, c21, c22, accumulate)
    if rows > 3:
        _put(out[m0 + 3], n0, c30, c31, c32, accumulate)


@njit(nogil=True, boundscheck=False, inline="always")
def _put(row, n0, a, b, c, accumulate):  # type: ignore[no-untyped-def]
    if accumulate:
        a, b, c = add8(load8(row, n0), a), add8(load8(row, n0 + 8), b), add8(load8(row, n0 + 16), c)
    store8(row, n0, a)
    store8(row, n0 + 8, b)
    store8(row, n0 + 16, c)


@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _panel_gemm(x, wp, out, threads):  # type: ignore[no-untyped-def]
    rows, in_features = x.shape
    panels = out.shape[1] // PANEL
    per_thread = (panels + threads - 1) // threads
    for t in prange(threads):       # each thread a contiguous run of panels
        for p in range(t * per_thread, min(panels, (t + 1) * per_thread)):
            base = p * in_features * PANEL
            for k0 in range(0, in_features, _CHUNK):
                k1 = min(in_features, k0 + _CHUNK)
                for m0 in range(0, rows, _ROWS):
                    _microkernel(x, m0, min(_ROWS, rows - m0), wp, base, k0, k1, out, p * PANEL,
                                 k0 > 0)


def panel_gemm(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None = None,
               panel_data: np.ndarray | None = None) -> torch.Tensor:
    """fp32 x [T, in] @ the packed weight (fp32 or bf16 panels) -> fp32 [T, out] (+ bias).
    panel_data: `_flat(panels)`, if the caller keeps it (a decode step makes ~120 of these
    calls, each short enough that converting again would show)."""
    num_panels, in_features, width = panels.shape
    assert width == PANEL and x.shape[-1] == in_features and x.dtype == torch.float32
    if x.dim() != 2 or not x.is_contiguous():
        x = x.reshape(-1, in_features).contiguous()
    out = torch.empty(x.shape[0], num_panels * PANEL)
    if x.shape[0]:
        data = _flat(panels) if panel_data is None else panel_data
        _panel_gemm(x.numpy(), data, out.numpy(), numba_threads())
    return out if bias is None else out.add_(bias)


def warm_up() -> None:
    """Compile the panel GEMM, fp32 and bf16 panels, now (or load it from numba's disk cache)."""
    for dtype in (torch.float32, torch.bfloat16):
        panel_gemm(torch.ones(5, 3), pack_panels(torch.ones(PANEL, 3), dtype))
    if dot_bf16_linear():
        dot_bf16.warm_up()


def _onednn_copy(layer: LinearWeight) -> torch.Tensor:
    """The fp32 panels' weight [out, in] reordered for oneDNN."""
    assert layer.panels is not None
    weight = layer.panels.transpose(1, 2).reshape(layer.shape[0], layer.shape[1])
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)


def keep_onednn_copy(layer: LinearWeight, rows: int, packed: torch.Tensor | None = None) -> None:
    """Give an fp32 layer with panels a oneDNN copy that its fp32 branch runs from `rows` rows
    (what calibrate_panels measured; again for a model rebuilt with new weights)."""
    layer.packed = _onednn_copy(layer) if packed is None else packed
    layer.onednn_rows = rows


def linear_fp32(x: torch.Tensor, layer: LinearWeight) -> torch.Tensor:
    """The fp32 branch of a layer whatever its dtype: x [T, in] -> fp32 [T, out]."""
    bias = None if layer.bias is None else layer.bias.float()
    if layer.pairs is not None and not x.is_cuda:
        if x.dtype == torch.bfloat16:
            return _on_pairs(x, layer, bias, torch.float32)
        weight = layer.pairs.permute(0, 2, 1, 3).reshape(layer.shape)     # fp32 x: unpacked
        if layer.gated:
            weight = weight[_weight_order(weight.shape[0])]
        return F.linear(x.float(), weight.float(), bias)
    if (layer.packed is not None or layer.panels is not None) and not x.is_cuda:
        return _fp32_packed(x.float(), layer, bias)
    return F.linear(x.float(), layer.weight.float(), bias)
