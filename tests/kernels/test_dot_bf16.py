"""The AVX512-BF16 dot-product GEMM (kernels/dot_bf16.py): it only compiles on a CPU with the
instruction, so these tests run there (the Zen 4 and Xeon boxes) and skip elsewhere."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.linear as linear_mod
from kernels.backend import dot_bf16_linear
from kernels.dot_bf16 import PANEL, dot_gemm, pack_pairs

pytestmark = pytest.mark.skipif(not dot_bf16_linear(),
                                reason="the CPU has no AVX512-BF16 dot product (or it is switched off)")


def _exact(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x.double() @ w.double().T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 10, 17, 33])
def test_products_are_fp32_sums_of_exact_products(rows: int) -> None:
    """Every row count through both microkernels (2 and 8 rows) and their tails: fp32 output
    within fp32 summation error of the exact product; bf16 output the fp32 sum plus the bias
    rounded once (torch's rounding, bit for bit)."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(4 * PANEL, 600, generator=g).bfloat16()
    bias = torch.randn(4 * PANEL, generator=g).bfloat16()
    x = torch.randn(rows, 600, generator=g).bfloat16()
    pairs = pack_pairs(w)
    fp32 = dot_gemm(x, pairs, out_dtype=torch.float32)
    assert fp32.dtype == torch.float32 and fp32.shape == (rows, 4 * PANEL)
    scale = (x.double().abs() @ w.double().abs().T)                  # sum of |products|
    assert ((fp32.double() - _exact(x, w)).abs() <= 600 * 2 ** -24 * scale + 1e-30).all()
    out = dot_gemm(x, pairs, bias)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (fp32 + bias.float()).bfloat16())
    # each row is computed as if alone: the same bits in any batch
    assert torch.equal(dot_gemm(x[-1:], pairs, bias)[0], out[-1])


def test_rounding_to_bf16_matches_torch_at_the_edges() -> None:
    """Sums of two values (w = 1, 1) that round up, down, to even, overflow to inf, and NaN."""
    a = torch.tensor([1.0, 1.0, 1.0, 3.0e38, -3.0e38, float("nan"), float("inf"), 0.0])
    b = torch.tensor([2 ** -8, 2 ** -9, 3 * 2 ** -9, 3.0e38, -3.0e38, 1.0, 1.0, -0.0])
    x = torch.stack([a, b], 1).bfloat16()                    # each row: (a, b) as bf16
    out = dot_gemm(x, pack_pairs(torch.ones(PANEL, 2).bfloat16()))
    want = (x[:, 0].float() + x[:, 1].float()).bfloat16()
    assert torch.equal(out[:, 0].isnan(), want.isnan())
    keep = ~want.isnan()
    assert torch.equal(out[keep, 0].view(torch.int16), want[keep].view(torch.int16))
    assert out[5, 0].view(torch.int16).item() == 0x7FC0      # torch's quiet NaN


def test_a_bf16_layer_keeps_pairs_and_its_small_products_run_on_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On this CPU a bf16 layer's panels take the pair layout (no fp32 or bf16 panels beside
    them); below the bf16 crossover apply_linear runs dot_gemm, from it oneDNN's bf16 product;
    the fp32 branch takes a bf16 input on the pairs and an fp32 one on the unpacked weight."""
    monkeypatch.setattr(linear_mod, "MIN_BF16_ROWS", {(64, 96, "dot"): 4})
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=g).bfloat16()
    bias = torch.randn(96, generator=g).bfloat16()
    layer = linear_mod.prepare_linear(w, bias)
    assert layer.pairs is not None and layer.panels is None
    for rows in (1, 3, 4, 9):
        x = torch.randn(rows, 64, generator=g).bfloat16()
        out = linear_mod.apply_linear(x, layer)
        if rows < 4:
            assert torch.equal(out, dot_gemm(x, layer.pairs, bias)), rows
        elif layer.packed_bf16 is not None:
            assert torch.equal(out, linear_mod.linear_bf16(x, layer)), rows
        torch.testing.assert_close(out, F.linear(x, w, bias), rtol=1e-2, atol=1e-2)
    x = torch.randn(5, 64, generator=g)
    torch.testing.assert_close(linear_mod.linear_fp32(x, layer), F.linear(x, w.float(), bias.float()),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(linear_mod.linear_fp32(x.bfloat16(), layer),
                       dot_gemm(x.bfloat16(), layer.pairs, bias, out_dtype=torch.float32))


def test_the_switch_and_the_shapes_without_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """PLUMBLINE_DOT_BF16=0 keeps bf16 panels for the fp32 panel GEMM; an odd input width or an
    output width off the panel grid gets no pairs either; fp32 layers never do."""
    w = torch.randn(PANEL, 8).bfloat16()
    assert linear_mod.prepare_linear(w.float()).pairs is None
    assert linear_mod.prepare_linear(torch.randn(PANEL, 7).bfloat16()).pairs is None
    assert linear_mod.prepare_linear(torch.randn(PANEL + 8, 8).bfloat16()).pairs is None
    monkeypatch.setenv("PLUMBLINE_DOT_BF16", "0")
    layer = linear_mod.prepare_linear(w)
    assert layer.pairs is None and layer.panels is not None and layer.panels.dtype == torch.bfloat16


def test_calibrate_keeps_a_threshold_per_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two engines in one process, one on the dot-product kernel and one on the fp32 panels
    (PLUMBLINE_DOT_BF16=0, as benchmarks.engine_ab compares them), each keep the crossover
    measured against their own kernel."""
    from kernels.calibrate import calibrate
    monkeypatch.setattr(linear_mod, "MIN_BF16_ROWS", {})
    dot = calibrate([(64, 96)], rows=(1, 4), repeats=2)[(64, 96)]
    monkeypatch.setenv("PLUMBLINE_DOT_BF16", "0")
    fp32 = calibrate([(64, 96)], rows=(1, 4), repeats=2)[(64, 96)]
    assert linear_mod.MIN_BF16_ROWS == {(64, 96, "dot"): dot, (64, 96, "fp32"): fp32}


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 11, 32])
def test_gate_up_silu_in_one_call_is_torchs_silu_times_up(rows: int) -> None:
    """A [gate; up] layer (prepare_gate_up) keeps its panels gate, up, gate, up, ...; below
    its crossover gate_up_silu runs both products and silu(gate) * up in one call, rounding
    where torch's bf16 ops round: the same bf16 values as silu_mul of the layer's product, but
    for rare ties where our exp and torch's differ in the last fp32 bit (at most one in a
    thousand here, one bf16 step each). The layer's plain product keeps the weight's column
    order."""
    g = torch.Generator().manual_seed(rows)
    inter = 2 * PANEL
    w = torch.randn(2 * inter, 96, generator=g).bfloat16()
    layer = linear_mod.prepare_gate_up(w)
    assert layer.gated and layer.pairs is not None
    x = torch.randn(rows, 96, generator=g).bfloat16() * 2
    product = linear_mod.linear_below(x, layer)
    assert torch.equal(product, dot_gemm(x, pack_pairs(w)))             # columns in order
    assert torch.equal(linear_mod.linear_fp32(x.float(), layer),
                       F.linear(x.float(), w.float()))                   # the unpacked weight too
    fused = linear_mod.gate_up_silu(x, layer)
    want = linear_mod.silu_mul(product)
    assert fused.shape == (rows, inter) and fused.dtype == torch.bfloat16
    differ = fused != want
    assert differ.float().mean() <= 1e-3
    steps = (fused[differ].view(torch.int16).int() - want[differ].view(torch.int16).int()).abs()
    assert (steps <= 1).all()


def test_gate_up_without_pairs_or_with_bias_is_not_gated(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bias, or an intermediate size off the panel grid, keeps the plain layout; gate_up_silu
    is then the product and torch's silu * up; from the crossover likewise (oneDNN)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4 * PANEL, 32, generator=g).bfloat16()
    bias = torch.randn(4 * PANEL, generator=g).bfloat16()
    layer = linear_mod.prepare_gate_up(w, bias)
    assert not layer.gated
    x = torch.randn(3, 32, generator=g).bfloat16()
    assert torch.equal(linear_mod.gate_up_silu(x, layer),
                       linear_mod.silu_mul(linear_mod.apply_linear(x, layer)))
    assert not linear_mod.prepare_gate_up(torch.randn(3 * PANEL, 32).bfloat16()).gated
    gated = linear_mod.prepare_gate_up(w)
    monkeypatch.setattr(linear_mod, "MIN_BF16_ROWS", {(32, 4 * PANEL, "dot"): 2})
    assert gated.packed_bf16 is not None       # oneDNN computes bf16 wherever the dot kernel runs
    assert torch.equal(linear_mod.gate_up_silu(x, gated),
                       linear_mod.silu_mul(linear_mod.linear_bf16(x, gated)))
