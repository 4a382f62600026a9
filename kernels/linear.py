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
says from how many rows the bf16 product is used; the engine re-measures it with `calibrate`
when it loads a bf16 body. The bf16 product is oneDNN's on the weight prepacked in bf16 (where
this CPU's oneDNN computes bf16: `bf16_prepack`): torch's F.linear on the plain bf16 weight
took up to twice as long at decode sizes (1-32 rows), most likely reordering the weight at every
call (kernels_bench --only linear). Below the threshold, the product runs in fp32 on the same values: through the
panel GEMM on panels kept in bf16 (the microkernel widens each weight exactly as it loads it,
so a decode step reads half the bytes of fp32 panels, and nothing is stored twice), or through
oneDNN on an fp32 prepacked copy where the shape has no panels. The fp32 branch rounds its
output to bf16, so both branches agree to bf16 rounding (accumulation order aside).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from kernels.backend import numba_threads, panel_linear, prepack_linear
from kernels.simd import add8, fma8, load8, splat8, store8, zeros8

# oneDNN picks its blocked layout for an expected row count. 32 was as fast as or faster than 1
# and 512 for 1-64 rows, and within noise for a 512-row prefill chunk.
PACK_ROWS_HINT = 32

# (in_features, out_features) -> the smallest number of rows at which bf16 is used: what
# `calibrate` measured when the engine loaded a bf16 body. Shapes it has not measured use
# DEFAULT_MIN_BF16_ROWS, what it found for every SmolLM2-135M shape on a CPU with AVX512-BF16
# (Zen 4, torch 2.13: 2 or 8 rows from run to run; the larger keeps one-stream decode in fp32).
MIN_BF16_ROWS: dict[tuple[int, int], int] = {}
DEFAULT_MIN_BF16_ROWS = 8

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
    packed = panels = packed_bf16 = None
    if not weight.is_cuda and panel_linear() and weight.shape[0] % PANEL == 0:
        panels = pack_panels(weight, weight.dtype if weight.dtype == torch.bfloat16 else None)
    elif not weight.is_cuda and prepack_linear():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.float().contiguous(), PACK_ROWS_HINT)
    if weight.dtype == torch.bfloat16 and not weight.is_cuda and bf16_prepack():
        packed_bf16 = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)
    fp32_packed = packed is not None or panels is not None
    if fp32_packed and (weight.dtype == torch.float32 or packed_bf16 is not None):
        weight = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
    return LinearWeight(weight, bias, packed, panels, None if panels is None else _flat(panels),
                        packed_bf16)


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


def use_bf16(num_rows: int, in_features: int, out_features: int) -> bool:
    """Whether a [num_rows, in] x [out, in]^T product of a bf16 layer should run in bf16."""
    threshold = MIN_BF16_ROWS.get((in_features, out_features), DEFAULT_MIN_BF16_ROWS)
    return num_rows >= threshold


def _onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def apply_linear(x: torch.Tensor, layer: LinearWeight) -> torch.Tensor:
    """x [T, in] -> [T, out], in x's dtype (which is the layer's)."""
    if (layer.packed is None and layer.panels is None) or x.is_cuda:
        return F.linear(x, layer.weight, layer.bias)
    if x.dtype == torch.float32:
        return _fp32_packed(x, layer, layer.bias)
    out_features, in_features = layer.shape
    if use_bf16(x.numel() // in_features, in_features, out_features):
        return linear_bf16(x, layer)
    return linear_fp32(x, layer).to(x.dtype)


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


def _median_ms(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    return _medians_ms((fn,), repeats)[0]


def _medians_ms(fns, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Median ms of each of fns over `repeats` calls after one warm-up, timed in alternation: a
    burst of load or a clock change on a busy or virtual CPU then hits all of them, not
    whichever was being timed."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [sorted(spent)[repeats // 2] * 1e3 for spent in times]


def _crossover(rows: tuple[int, ...], wins: Callable[[int], bool]) -> int:
    """The smallest of `rows` from which `wins(n)` holds at every larger count tried (largest
    first, stopping at the first loss), NEVER where it holds at none."""
    threshold = NEVER
    for n in sorted(rows, reverse=True):
        if not wins(n):
            break
        threshold = n
    return threshold


def _wins(candidate, incumbent, repeats: int) -> bool:  # type: ignore[no-untyped-def]
    """Whether `candidate` runs faster than `incumbent` (medians, in alternation). A loss is
    timed once more before it counts: one burst of load would otherwise move a _crossover above
    every smaller row count (under a profiler at start-up the down projection kept fp32 at 8)."""
    for _ in range(2):
        t_candidate, t_incumbent = _medians_ms((candidate, incumbent), repeats)
        if t_candidate < t_incumbent:
            return True
    return False


# Row counts up to this are timed on weights read from memory, not from cache (calibrate).
COLD_ROWS = 32


def _cold_bytes() -> int:
    """How many bytes of weights calibrate cycles through so that each read comes from memory:
    twice the last-level cache as sysfs reports it (64 MiB where it reports none), at most 256."""
    size = 32 << 20
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            text = (index / "size").read_text().strip()
            size = max(size, int(text[:-1]) << {"K": 10, "M": 20}[text[-1]])
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return min(2 * size, 256 << 20)


def calibrate(shapes: list[tuple[int, int]], rows: tuple[int, ...] = (1, 2, 8, 32, 128, 512),
              repeats: int = 15) -> dict[tuple[int, int], int]:
    """Measure the fp32/bf16 crossover of each (in, out) shape here; update MIN_BF16_ROWS.

    The threshold is the smallest of `rows` from which bf16 wins at every larger count tried
    (largest first, up to a prefill chunk). Without native bf16, a one-row bf16 product can tie
    fp32 while 8 rows already run far slower, so a first win from below would be misleading.

    Up to COLD_ROWS rows a product is bound by reading its weight, which in a decode step
    comes from memory (the model's weights do not fit in the cache), so it is timed on a cycle
    of copies of the layer larger than the cache: timed on one cached layer, oneDNN's bf16
    product won at one row here (Zen 4), and lost by a quarter in the engine's decode step."""
    found = {}
    for in_features, out_features in shapes:
        weight = torch.randn(out_features, in_features).bfloat16()
        copies = min(512, max(1, -(-_cold_bytes() // weight.nbytes)))    # tiny layers: fewer
        layers = [prepare_linear(weight.clone()) for _ in range(copies)]

        def bf16_wins(n: int) -> bool:
            x = torch.randn(n, in_features).bfloat16()
            # a large product is bound by arithmetic and steadier: fewer repeats (a big model's
            # 512-row products take a while)
            cycle = layers if n <= COLD_ROWS else layers[:1]
            reps = max(3, repeats // len(cycle) if n <= COLD_ROWS else repeats // 3)
            return _wins(lambda: [linear_bf16(x, layer) for layer in cycle],
                         lambda: [linear_fp32(x, layer).bfloat16() for layer in cycle], reps)
        found[(in_features, out_features)] = _crossover(rows, bf16_wins)
    MIN_BF16_ROWS.update(found)
    return found


def calibrate_panels(layer: LinearWeight, rows: tuple[int, ...] = (1, 2, 8, 32),
                     repeats: int = 9) -> int:
    """From how many rows (_crossover) oneDNN's fp32 product beats the panels on this fp32 layer
    (the lm_head, read from memory as a decode step reads it); where it wins anywhere, keep a
    oneDNN copy beside the panels. oneDNN uses AVX-512 where the CPU has it, the panels AVX2:
    on Zen 4 oneDNN won at 32 rows, the panels at 1-2 (docs/BENCHMARKS.md, linear layers)."""
    if layer.panels is None or layer.panels.dtype != torch.float32 or not prepack_linear():
        return NEVER
    packed = _onednn_copy(layer)

    def onednn_wins(n: int) -> bool:
        x = torch.randn(n, layer.shape[1])
        return _wins(lambda: _onednn(x, packed, None),
                     lambda: panel_gemm(x, layer.panels, None, layer.panel_data), repeats)
    threshold = _crossover(rows, onednn_wins)
    if threshold != NEVER:
        keep_onednn_copy(layer, threshold, packed)
    return threshold


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
    if (layer.packed is not None or layer.panels is not None) and not x.is_cuda:
        return _fp32_packed(x.float(), layer, bias)
    return F.linear(x.float(), layer.weight.float(), bias)
