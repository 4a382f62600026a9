from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.linear as linear_mod
from kernels.backend import prepack_linear
from kernels.linear import apply_linear, linear_fp32, prepare_linear, use_bf16

needs_prepack = pytest.mark.skipif(not prepack_linear(), reason="torch has no oneDNN prepacking")


def test_choice_per_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_mod, "MIN_BF16_ROWS", {(576, 960, "fp32"): 3, (576, 960, "dot"): 5})
    assert not use_bf16(1, 576, 960) and not use_bf16(2, 576, 960)
    assert use_bf16(3, 576, 960) and use_bf16(512, 576, 960)
    assert not use_bf16(4, 576, 960, "dot") and use_bf16(5, 576, 960, "dot")
    assert not use_bf16(7, 64, 96) and use_bf16(8, 64, 96)      # unmeasured: the default, 8
    assert not use_bf16(31, 64, 96, "dot") and use_bf16(32, 64, 96, "dot")


@needs_prepack
@pytest.mark.parametrize("rows", [1, 3, 32, 77, 512])
@pytest.mark.parametrize("with_bias", [False, True])
def test_prepacked_fp32_equals_f_linear(rows: int, with_bias: bool) -> None:
    """The oneDNN path on the prepacked weight computes the same product as F.linear, for row
    counts on and off the packing hint, with and without bias, on a non-contiguous input; the
    plain copy is dropped (a meta tensor keeps its shape and dtype)."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(160, 96, generator=g)
    bias = torch.randn(160, generator=g) if with_bias else None
    layer = prepare_linear(w, bias)                  # 160 columns: not whole panels, so oneDNN
    assert layer.packed is not None and layer.panels is None and layer.weight.is_meta
    assert layer.shape == w.shape and layer.dtype == torch.float32
    x = torch.randn(rows, 2 * 96, generator=g)[:, ::2]           # a strided view, as after a split
    out = apply_linear(x, layer)
    assert out.dtype == torch.float32 and out.shape == (rows, 160)
    torch.testing.assert_close(out, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 32, 77, 512])
@pytest.mark.parametrize("with_bias", [False, True])
def test_panel_gemm_equals_f_linear(rows: int, with_bias: bool) -> None:
    """Our panel GEMM: row counts below, at and off its 4-row block, an input dimension of two
    full 256-wide chunks and a partial one, bias, a strided input; the plain copy is dropped."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(7 * linear_mod.PANEL, 600, generator=g)
    bias = torch.randn(w.shape[0], generator=g) if with_bias else None
    layer = prepare_linear(w, bias)
    assert layer.panels is not None and layer.packed is None and layer.weight.is_meta
    assert layer.shape == w.shape and layer.dtype == torch.float32
    x = torch.randn(rows, 2 * 600, generator=g)[:, ::2]
    out = apply_linear(x, layer)
    assert out.shape == (rows, w.shape[0]) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, w, bias), rtol=1e-5, atol=1e-4)
    # Rows are independent: each row's result is the same alone as in the batch.
    assert torch.equal(apply_linear(x[-1:], layer)[0], out[-1])


@needs_prepack
def test_onednn_switch_keeps_panel_shapes_on_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUMBLINE_KERNELS", "onednn")
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 32, generator=g), torch.randn(5, 32, generator=g)
    layer = prepare_linear(w)
    assert layer.packed is not None and layer.panels is None
    torch.testing.assert_close(apply_linear(x, layer), F.linear(x, w), rtol=1e-5, atol=1e-5)


needs_bf16_prepack = pytest.mark.skipif(
    not linear_mod.bf16_prepack(), reason="this CPU's oneDNN computes no bf16 product (no AVX512)")


@needs_bf16_prepack
@pytest.mark.parametrize("rows", [1, 8, 33, 512])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_branch_runs_on_the_weight_prepacked_in_bf16(rows: int, with_bias: bool) -> None:
    """A bf16 layer is prepacked in bf16 for its bf16 branch (oneDNN), and its plain copy is
    dropped: both branches read packed forms. The product is F.linear's on the plain weight, on
    a strided input too."""
    g = torch.Generator().manual_seed(rows)
    for out_features in (4 * linear_mod.PANEL, 100):         # panels, and oneDNN's fp32 layout
        w16 = torch.randn(out_features, 64, generator=g).bfloat16()
        bias = torch.randn(out_features, generator=g).bfloat16() if with_bias else None
        layer = prepare_linear(w16, bias)
        assert layer.packed_bf16 is not None and layer.weight.is_meta
        assert layer.shape == w16.shape and layer.dtype == torch.bfloat16
        x = torch.randn(rows, 128, generator=g).bfloat16()[:, ::2]
        out = linear_mod.linear_bf16(x, layer)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
        torch.testing.assert_close(out, F.linear(x, w16, bias), rtol=1e-2, atol=1e-2)
        exact = F.linear(x.float(), w16.float(), None if bias is None else bias.float())
        torch.testing.assert_close(out.float(), exact, rtol=1e-2, atol=1e-2)


def test_without_bf16_prepacking_the_bf16_branch_reads_the_plain_weight(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_mod, "bf16_prepack", lambda: False)
    g = torch.Generator().manual_seed(1)
    w16 = torch.randn(96, 48, generator=g).bfloat16()
    layer = prepare_linear(w16)
    assert layer.packed_bf16 is None and torch.equal(layer.weight, w16)
    x = torch.randn(3, 48, generator=g).bfloat16()
    assert torch.equal(linear_mod.linear_bf16(x, layer), F.linear(x, w16))


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 33])
def test_bf16_panels_compute_what_fp32_panels_of_the_same_values_do(
        rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 layer's panels stay bf16 (half the bytes; no fp32 copy): the microkernel widens
    each weight exactly as it loads it, so the product has the bits of fp32 panels holding the
    widened values. (Where the CPU has AVX512-BF16 the panels take kernels.dot_bf16's layout
    instead, unless PLUMBLINE_DOT_BF16=0: tests/kernels/test_dot_bf16.py.)"""
    monkeypatch.setenv("PLUMBLINE_DOT_BF16", "0")
    g = torch.Generator().manual_seed(rows)
    w16 = torch.randn(5 * linear_mod.PANEL, 600, generator=g).bfloat16()
    layer = prepare_linear(w16)
    assert layer.panels is not None and layer.panels.dtype == torch.bfloat16
    x = torch.randn(rows, 600, generator=g)
    want = linear_mod.panel_gemm(x, linear_mod.pack_panels(w16.float()))
    assert torch.equal(linear_fp32(x.bfloat16(), layer),
                       linear_mod.panel_gemm(x.bfloat16().float(),
                                             linear_mod.pack_panels(w16.float())))
    torch.testing.assert_close(linear_mod.panel_gemm(x, layer.panels), want, rtol=0, atol=0)


def test_without_prepacking_is_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUMBLINE_KERNELS", "torch")
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 32, generator=g), torch.randn(5, 32, generator=g)
    layer = prepare_linear(w)
    assert layer.packed is None and layer.panels is None
    assert torch.equal(apply_linear(x, layer), F.linear(x, w))


@pytest.mark.parametrize("rows", [1, 2, 9])
def test_both_bf16_branches_agree_with_bf16_linear(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w16 = torch.randn(96, 64, generator=g).bfloat16()
    bias = torch.randn(96, generator=g).bfloat16()
    x = torch.randn(rows, 64, generator=g).bfloat16()
    out = apply_linear(x, prepare_linear(w16, bias))
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
    expected = F.linear(x.float(), w16.float(), bias.float())     # exact products, fp32 sums
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@needs_prepack
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_layer_with_a_onednn_copy_takes_it_from_its_row_count(with_bias: bool) -> None:
    """The lm_head's two fp32 forms (calibrate_panels keeps both where oneDNN wins from some
    row count): below the threshold the panels' bits, from it oneDNN's, both F.linear's values."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5 * linear_mod.PANEL, 72, generator=g)
    bias = torch.randn(w.shape[0], generator=g) if with_bias else None
    layer = prepare_linear(w, bias)
    assert layer.packed is None and layer.onednn_rows == linear_mod.NEVER
    linear_mod.keep_onednn_copy(layer, 4)
    assert layer.packed is not None and layer.panels is not None
    for n in (1, 3, 4, 9):
        x = torch.randn(n, 72, generator=g)
        out = apply_linear(x, layer)
        torch.testing.assert_close(out, F.linear(x, w, bias), rtol=1e-5, atol=1e-4)
        panels = linear_mod.panel_gemm(x, layer.panels, bias, layer.panel_data)
        onednn = linear_mod._onednn(x, layer.packed, bias)
        assert torch.equal(out, panels if n < 4 else onednn), n
