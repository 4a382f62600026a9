"""Choosing the device (EngineConfig.device, `plumbline serve --device`) and the dtype on it, the
refusals (cuda without a GPU, deterministic mode on cuda), and the host<->device transfers as
they behave on the CPU. torch.cuda is patched where a test needs one answer on every machine."""
from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.cuda_graphs import batch_sizes
from engine.device import DeviceUnavailable, Transfer, choose_device
from engine.model_runner import choose_dtype
from gateway.cli import main


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_auto_is_the_cpu_without_a_gpu_and_cuda_asked_for_is_refused(no_gpu):
    assert EngineConfig().device == "cpu"          # the library's default; the server's is auto
    assert choose_device(EngineConfig(device="auto")) == ("cpu", "no CUDA device is available")
    assert choose_device(EngineConfig(device="cpu")) == ("cpu", "asked for")
    with pytest.raises(DeviceUnavailable, match=r"--device cuda: no CUDA device is available"):
        choose_device(EngineConfig(device="cuda"))


def test_auto_is_cuda_with_a_gpu_except_in_deterministic_mode(a_gpu):
    assert choose_device(EngineConfig(device="auto")) == (
        "cuda", "a CUDA device is available (Test GPU)")
    assert choose_device(EngineConfig(device="cpu")) == ("cpu", "asked for")
    device, reason = choose_device(EngineConfig(device="auto", deterministic=True))
    assert device == "cpu" and "batch-invariant kernels run on the CPU" in reason
    assert choose_dtype(EngineConfig(dtype="auto"), "cuda") == (
        "bfloat16", "the GPU computes bf16 natively")
    assert choose_dtype(EngineConfig(dtype="float32"), "cuda") == ("float32", "asked for")


def test_deterministic_mode_on_cuda_is_refused_naming_what_is_missing():
    with pytest.raises(AssertionError, match="deterministic mode is not supported on cuda") as e:
        EngineConfig(device="cuda", deterministic=True)
    assert "kernels/invariant.py" in str(e.value) and "--device cpu" in str(e.value)


def test_serve_refuses_cuda_without_a_gpu_at_start_up(no_gpu, capsys):
    assert main(["serve", "--device", "cuda", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration: --device cuda: no CUDA device is available" in err
    assert main(["serve", "--device", "cuda", "--deterministic"]) == 2
    assert "deterministic mode is not supported on cuda" in capsys.readouterr().err


def test_serve_options_for_the_device(no_gpu):
    import argparse

    from gateway.cli import _add_serve, config_from_args

    parser = argparse.ArgumentParser()
    _add_serve(parser.add_subparsers())
    default = config_from_args(parser.parse_args(["serve"])).engine
    assert default.device == "auto" and default.enable_cuda_graphs is True
    chosen = config_from_args(parser.parse_args(["serve", "--device", "cpu", "--no-cuda-graphs"]))
    assert chosen.engine.device == "cpu" and chosen.engine.enable_cuda_graphs is False
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--device", "tpu"])


def test_transfers_on_the_cpu_are_the_tensors_themselves():
    t = Transfer(torch.device("cpu"))
    up = t.up([3, 1, 2], torch.int32)
    assert up.dtype == torch.int32 and up.tolist() == [3, 1, 2] and not up.is_pinned()
    a, b = torch.ones(2), torch.zeros(3)
    got = t.read_back(a, None, b)
    assert got[0] is a and got[1] is None and got[2] is b


def test_cuda_graph_batch_sizes():
    assert batch_sizes(1) == [1]
    assert batch_sizes(8) == [1, 2, 4, 8]
    assert batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_sizes(70) == [1, 2, 4, 8, 16, 32, 48, 64, 70]
