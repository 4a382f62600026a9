"""Where the engine runs, and the only ways its step moves data between host and device.

One code path for every device: a CPU tensor's `.to("cpu")` is the tensor itself, so the CPU
path pays a function call per step input and nothing else, and the same code runs with CPU
tensors through the Triton kernels (PLUMBLINE_KERNELS=triton, TRITON_INTERPRET=1) as with CUDA
tensors. On cuda, step inputs go up from pinned host memory without blocking, and the step's
results come down in `read_back`: every result tensor copied at once, then the one
synchronisation of the step.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.config import EngineConfig


class DeviceUnavailable(RuntimeError):
    """The configuration asks for a device this machine does not have."""


def choose_device(config: EngineConfig) -> tuple[str, str]:
    """The device for config.device, and why; raises DeviceUnavailable for cuda without a GPU."""
    has_cuda = torch.cuda.is_available()
    if config.device == "cuda":
        if not has_cuda:
            raise DeviceUnavailable(
                f"--device cuda: no CUDA device is available (torch {torch.__version__}, built "
                f"with CUDA {torch.version.cuda or 'none'}; torch.cuda.is_available() is False)")
        return "cuda", "asked for"
    if config.device == "cpu":
        return "cpu", "asked for"
    if not has_cuda:
        return "cpu", "no CUDA device is available"
    if config.deterministic:
        return "cpu", "deterministic mode's batch-invariant kernels run on the CPU only"
    return "cuda", f"a CUDA device is available ({torch.cuda.get_device_name()})"


def cuda_bf16() -> bool:
    """Whether the current CUDA device computes bf16 natively (Ampere and later)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class Transfer:
    """Host <-> device copies of one runner: pinned host memory and non-blocking copies on cuda."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pin = device.type == "cuda"

    def up(self, data: Sequence[Any], dtype: torch.dtype) -> torch.Tensor:
        """A Python list -> a tensor on the device (copied without blocking the host)."""
        return torch.tensor(data, dtype=dtype, pin_memory=self.pin).to(self.device, non_blocking=True)

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor -> the device without blocking (through pinned memory on cuda)."""
        return tensor.pin_memory().to(self.device, non_blocking=True) if self.pin else tensor

    def read_back(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Device tensors -> host tensors, with one synchronisation for all of them; on the CPU,
        the tensors themselves. The step calls it once, for the sampled tokens and logprobs."""
        if not self.pin:
            return list(tensors)
        host = [None if t is None else
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in tensors]
        torch.cuda.current_stream().synchronize()
        return host
