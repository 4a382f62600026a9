"""Which product is faster here, measured when a model is loaded: the CPUs we run on differ too
much (AVX2 only, AVX-512, AVX512-BF16, AMX; 2 vCPUs or a socket) for one rule to hold.

- `calibrate`: per bf16 layer shape, from how many rows oneDNN's bf16 product beats the layer's
  small-product branch (kernels.linear: the dot-product GEMM or the fp32 panels); it sets
  kernels.linear.MIN_BF16_ROWS.
- `calibrate_panels`: from how many rows oneDNN's fp32 product beats the fp32 panels on the
  lm_head; where it wins anywhere the head keeps a oneDNN copy for those rows.

Each is a crossover: the smallest row count from which the candidate wins at every larger count
tried, read from the top, a loss timed twice before it counts. Products of decode size are timed
on weights read from memory, as a decode step reads them, not on one cached layer.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from kernels import linear
from kernels.backend import prepack_linear
from kernels.linear import (NEVER, LinearWeight, _onednn, _onednn_copy, keep_onednn_copy,
                            linear_below, linear_bf16, panel_gemm, prepare_linear)


def median_ms(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    return medians_ms((fn,), repeats)[0]


def medians_ms(fns, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
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
        t_candidate, t_incumbent = medians_ms((candidate, incumbent), repeats)
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
    """Measure each (in, out) shape's crossover here, oneDNN's bf16 product against the
    small-product kernel prepare_linear gives the shape now (kernels.linear.below); update
    MIN_BF16_ROWS for that kernel.

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
                         lambda: [linear_below(x, layer) for layer in cycle], reps)
        found[(in_features, out_features)] = _crossover(rows, bf16_wins)
        linear.MIN_BF16_ROWS[(in_features, out_features, linear.below(layers[0]))] = \
            found[(in_features, out_features)]
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
