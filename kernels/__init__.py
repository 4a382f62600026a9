"""The engine's hot operations. The engine calls only these public functions."""
from kernels import (attention, decode_cpu, invariant, kv_store, linear, logit_mask, metadata,
                     prefill_cpu, rmsnorm, rotary, split_head)
from kernels.logit_mask import apply_token_bitmask
from kernels.linear import LinearWeight, apply_linear, gate_up_silu, prepare_gate_up, prepare_linear
from kernels.metadata import AttentionMetadata, slots_for
from kernels.attention import paged_attention
from kernels.kv_store import store_kvcache
from kernels.rmsnorm import rms_norm
from kernels.rotary import apply_rotary, rotate_and_store
from kernels.split_head import SplitHead, prepare_split_head, split_head_logits

__all__ = ["AttentionMetadata", "LinearWeight", "apply_linear", "apply_rotary", "apply_token_bitmask",
           "gate_up_silu", "paged_attention", "prepare_gate_up", "prepare_linear", "prepare_split_head", "rms_norm", "rotate_and_store",
           "slots_for", "SplitHead", "split_head_logits", "store_kvcache", "warm_up"]


def warm_up() -> None:
    """Compile the numba CPU kernels (or load them from numba's cache) before the first request."""
    decode_cpu.warm_up()
    kv_store.warm_up()
    linear.warm_up()
    logit_mask.warm_up()
    prefill_cpu.warm_up()
    rmsnorm.warm_up()
    rotary.warm_up()
