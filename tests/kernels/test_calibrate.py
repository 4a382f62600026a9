from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.calibrate as calibrate_mod
import kernels.linear as linear_mod
from kernels.backend import prepack_linear
from kernels.linear import apply_linear, prepare_linear, use_bf16

needs_prepack = pytest.mark.skipif(not prepack_linear(), reason="torch has no oneDNN prepacking")


def test_calibrate_sets_the_threshold_use_bf16_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_mod, "MIN_BF16_ROWS", dict(linear_mod.MIN_BF16_ROWS))
    found = calibrate_mod.calibrate([(64, 96)], rows=(1, 4), repeats=2)
    threshold = found[(64, 96)]
    assert threshold in (1, 4, linear_mod.NEVER)
    kernel = linear_mod.below(prepare_linear(torch.zeros(96, 64).bfloat16()))
    assert [use_bf16(n, 64, 96, kernel) for n in (1, 4, 1 << 20)] == \
        [n >= threshold for n in (1, 4, 1 << 20)]


@needs_prepack
def test_calibrate_panels_keeps_the_copy_only_where_onednn_won() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4 * linear_mod.PANEL, 64, generator=g)
    layer = prepare_linear(w)
    threshold = calibrate_mod.calibrate_panels(layer, rows=(1, 4), repeats=2)
    assert threshold in (1, 4, linear_mod.NEVER)
    assert (layer.packed is not None) == (threshold != linear_mod.NEVER)
    assert layer.onednn_rows == threshold
    x = torch.randn(6, 64, generator=g)
    torch.testing.assert_close(apply_linear(x, layer), F.linear(x, w), rtol=1e-5, atol=1e-4)
    # a bf16 layer's panels hold bf16: its fp32 branch has no oneDNN copy to compare
    assert calibrate_mod.calibrate_panels(prepare_linear(w.bfloat16())) == linear_mod.NEVER


@needs_prepack
def test_calibration_times_a_loss_again_before_it_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """One noisy loss (a burst of load) must not move the threshold above smaller row counts:
    at 4 rows oneDNN loses once, then wins; at 1 row it loses twice."""
    timings = iter([(2.0, 1.0), (1.0, 2.0),      # 4 rows: (candidate, incumbent) ms
                    (2.0, 1.0), (2.0, 1.0)])     # 1 row
    calls = []

    def fake(fns, repeats):
        calls.append(len(fns))
        return list(next(timings))

    monkeypatch.setattr(calibrate_mod, "medians_ms", fake)
    layer = prepare_linear(torch.randn(2 * linear_mod.PANEL, 16))
    assert calibrate_mod.calibrate_panels(layer, rows=(1, 4), repeats=2) == 4
    assert calls == [2, 2, 2, 2] and layer.onednn_rows == 4 and layer.packed is not None
