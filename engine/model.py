"""Our llama-family model: RMSNorm, RoPE (with the config's scaling), GQA, SwiGLU.

It reads transformers' llama weights (q/k/v and gate/up fused at load), runs over a flat batch
of tokens from many sequences (paged KV cache: kernels.metadata, kernels.attention) and
computes the final projection fp32-accurate whatever the body's dtype: in fp32, or as the sum of
bf16 products of split operands (kernels/split_head.py).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kernels import (AttentionMetadata, LinearWeight, SplitHead, apply_linear, gate_up_silu,
                     invariant, paged_attention, prepare_gate_up, prepare_linear,
                     prepare_split_head, rms_norm, rotate_and_store, split_head_logits)


def rope_inv_freq(cfg: Any) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the attention scaling factor from the config."""
    head_dim = cfg.head_dim
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / params["factor"], 1.0
    if rope_type == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    raise ValueError(f"rope type {rope_type!r} is not supported")


class LlamaModel:
    """Weights as plain tensors; `forward` is a loop over layers. No nn.Module: nothing to train."""

    def __init__(self, cfg: Any, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 deterministic: bool = False, device: torch.device | str = "cpu",
                 head_precision: str = "fp32") -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.device = device = torch.device(device)
        # Deterministic mode swaps in the batch-invariant ops (kernels.invariant): every op with
        # a reduction computes a row the same way whatever else is in the step.
        self.deterministic = deterministic
        self.linear = invariant.linear if deterministic else apply_linear
        self.attention = invariant.paged_attention if deterministic else paged_attention
        self.rms_norm = invariant.rms_norm if deterministic else rms_norm
        self.gate_up_silu = invariant.gate_up_silu if deterministic else gate_up_silu
        prepare = invariant.prepare_linear if deterministic else prepare_linear
        prepare_mlp_in = invariant.prepare_linear if deterministic else prepare_gate_up
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        cfg.head_dim = self.head_dim
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {cfg.hidden_act!r} is not supported")
        # Every weight goes to the device before prepare_linear: a CUDA weight is not packed
        # for the CPU GEMMs (kernels/linear.py), and the state dict's CPU copy can be freed.
        self.embed = state["model.embed_tokens.weight"].to(device, dtype)  # [vocab, hidden]
        head = head_weight(state)
        # head_precision "split-bf16": the weight's bf16 hi and lo parts (engine/model_runner.py:
        # choose_head_precision); the logits are fp32-accurate either way.
        if head_precision == "split-bf16":
            self.lm_head: LinearWeight | SplitHead = prepare_split_head(head.to(device))
            self.head_linear: Any = split_head_logits
        else:
            self.lm_head = prepare(head.to(device, torch.float32).contiguous())  # [vocab, hidden] fp32
            self.head_linear = self.linear
        self.norm = state["model.norm.weight"].to(device, dtype)
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            get = lambda name: state[p + name].to(device, dtype)  # noqa: E731
            qkv = torch.cat([get("self_attn.q_proj.weight"), get("self_attn.k_proj.weight"),
                             get("self_attn.v_proj.weight")]).contiguous()
            qkv_bias = None
            if p + "self_attn.q_proj.bias" in state:
                qkv_bias = torch.cat([get("self_attn.q_proj.bias"), get("self_attn.k_proj.bias"),
                                      get("self_attn.v_proj.bias")])
            gate_up = torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")]).contiguous()
            self.layers.append({
                "input_norm": get("input_layernorm.weight"),
                "post_norm": get("post_attention_layernorm.weight"),
                "qkv": prepare(qkv, qkv_bias),
                "o": prepare(get("self_attn.o_proj.weight")),
                "gate_up": prepare_mlp_in(gate_up),
                "down": prepare(get("mlp.down_proj.weight")),
            })
        inv_freq, self.rope_scale = rope_inv_freq(cfg)
        max_pos = cfg.max_position_embeddings
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)                             # [max_pos, head_dim]
        self.cos = (emb.cos() * self.rope_scale).to(device)
        self.sin = (emb.sin() * self.rope_scale).to(device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden] (normed, body dtype)."""
        h, d = self.num_heads, self.head_dim
        kvh = self.num_kv_heads
        cos, sin = self.cos[positions], self.sin[positions]                 # [T, d]
        x = F.embedding(input_ids, self.embed)                              # [T, hidden]
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x, residual = self.rms_norm(x, layer["input_norm"], self.eps, residual)
            qkv = self.linear(x, layer["qkv"])                                 # [T, (h+2kvh)*d]
            # q rotated; k rotated and v stored in the cache, where attention reads them
            q = rotate_and_store(qkv, h, kvh, cos, sin, k_cache, v_cache, meta.slot_mapping)
            attn = self.attention(q, k_cache, v_cache, meta, self.scale)    # [T, h, d]
            x = self.linear(attn.reshape(-1, h * d), layer["o"])
            x, residual = self.rms_norm(x, layer["post_norm"], self.eps, residual)
            # silu(gate) * up [T, inter], fused into the product where kernels.dot_bf16 runs it
            x = self.linear(self.gate_up_silu(x, layer["gate_up"]), layer["down"])
        x, _ = self.rms_norm(x, self.norm, self.eps, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] -> logits [S, vocab] in fp32."""
        return self.head_linear(hidden.float(), self.lm_head)


def head_weight(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The lm_head's weight [vocab, hidden]: its own, or the tied embedding's."""
    return state.get("lm_head.weight", state["model.embed_tokens.weight"])

