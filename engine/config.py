"""Engine configuration: one frozen dataclass, validated once at startup."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    # The body's dtype; the lm_head's logits stay fp32-accurate. "auto" (the server's default):
    # bf16 where the CPU computes bf16 natively (AMX or AVX512-BF16), fp32 elsewhere and in
    # deterministic mode (engine/model_runner.py: choose_dtype). The library's default stays fp32:
    # the same numbers on every CPU unless asked.
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    # How the lm_head computes its fp32-accurate logits: fp32 FMA, or the sum of bf16 products
    # of hi + lo parts (kernels/split_head.py), for CPUs whose matrix units (AMX) compute bf16.
    # "auto": split-bf16 where the CPU has AMX, the body is bf16 and the split head measured
    # faster at load; fp32 elsewhere (engine/model_runner.py: choose_head_precision).
    head_precision: Literal["auto", "fp32", "split-bf16"] = "auto"
    # Where the model runs. "auto" (the server's default): cuda when torch sees a GPU (and
    # deterministic mode is off: its batch-invariant kernels are CPU kernels), else cpu
    # (engine/device.py: choose_device). The library's default stays the CPU, as its dtype stays
    # fp32: the same numbers on every machine unless asked.
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    # Decode-only steps replayed from CUDA graphs captured at start-up for common batch sizes
    # (engine/cuda_graphs.py); cuda only, ignored on the CPU.
    enable_cuda_graphs: bool = True
    block_size: int = 16
    num_kv_blocks: int = 0            # 0: derive from kv_cache_memory_mb
    kv_cache_memory_mb: int = 1024
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 0            # 0: the model's own context length
    enable_chunked_prefill: bool = True
    # Reuse the KV of whole blocks another request already computed for the same leading tokens
    # (engine/block_manager.py). Deterministic mode keeps it: a position's KV has the same bits
    # whichever request or chunk computed it.
    enable_prefix_caching: bool = True
    num_threads: int = 0              # 0: leave torch's default
    # Pin the compute thread's OpenMP team, one core per thread, and keep the event loop off
    # those cores (engine/cpu_bind.py): "none" (the library's default: a library does not move
    # its caller's threads unasked), "auto" (the server's: pin only when cores are left for
    # the loop) or a CPU list such as "2-5".
    cpu_bind: str = "none"
    seed: int = 0                     # seeds requests that carry no seed of their own
    # Bit-identical tokens and logprobs whatever else is in the batch, however the prompt was
    # chunked, cached or recomputed after preemption: batch-invariant kernels (kernels/invariant.py).
    deterministic: bool = False
    grammar_backend: str = "llguidance"
    grammar_compile_timeout: float = 5.0   # seconds; a slower compile is the request's 400
    # Budget-aware closing (grammars/closing.py): a constrained sequence with this many tokens
    # of max_tokens left (at most half of max_tokens) is steered to close its structure.
    # 0 turns it off; a request may set its own (SamplingParams.close_reserve).
    grammar_close_reserve: int = 48
    # Fast-forward (grammars.take_forced): append the tokens a grammar forces without a sampling
    # step of their own; they are computed together in the next step.
    grammar_fast_forward: bool = True

    def __post_init__(self) -> None:
        assert self.dtype in ("auto", "float32", "bfloat16"), f"unsupported dtype {self.dtype}"
        assert self.device in ("auto", "cpu", "cuda"), f"unsupported device {self.device}"
        assert self.head_precision in ("auto", "fp32", "split-bf16"), (
            f"unsupported head precision {self.head_precision}")
        split = self.head_precision == "split-bf16"
        assert not (split and (self.deterministic or self.device == "cuda")), (
            "--head-precision split-bf16 is a CPU kernel outside deterministic mode (whose lm_head "
            "is its batch-invariant fp32 kernel)")
        # Not a silent fallback to the CPU: whoever asked for cuda is told (engine/device.py).
        assert not (self.deterministic and self.device == "cuda"), (
            "deterministic mode is not supported on cuda: its batch-invariant kernels "
            "(kernels/invariant.py: linear, lm_head, rms_norm, silu_mul, attention, sampler) are "
            "CPU kernels; use --device cpu (or auto) with --deterministic")
        assert self.block_size in (8, 16, 32, 64), "block_size must be 8, 16, 32 or 64"
        assert self.max_num_seqs >= 1 and self.max_num_batched_tokens >= 1
        assert self.num_kv_blocks >= 0 and self.kv_cache_memory_mb >= 1
        assert self.grammar_compile_timeout > 0
        assert self.cpu_bind in ("auto", "none") or all(
            part.strip().replace("-", "", 1).isdigit() for part in self.cpu_bind.split(",")), (
            f"cpu_bind must be auto, none or a CPU list such as 0-3,6: {self.cpu_bind!r}")
        assert self.grammar_close_reserve >= 0
        if not self.enable_chunked_prefill:
            # Without chunking a whole prompt must fit in one step's budget.
            assert self.max_model_len == 0 or self.max_model_len <= self.max_num_batched_tokens
