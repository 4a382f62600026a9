"""Independent reference computations (transformers forward + hand-written transforms)."""
from __future__ import annotations

import torch


@torch.inference_mode()
def hf_logits(model, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """Logits [len(output_ids), vocab] that predicted each output token (teacher forcing)."""
    ids = torch.tensor([prompt_ids + output_ids])
    logits = model(ids).logits[0].float()
    return logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(output_ids)]


def processed_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       min_p: float = 0.0) -> torch.Tensor:
    """log p of the distribution sampled from: temperature, top-k, top-p (smallest set whose
    mass reaches top_p), min-p, renormalised. logits [n, vocab] -> [n, vocab]."""
    out = []
    for row in logits / temperature:
        keep = torch.ones_like(row, dtype=torch.bool)
        if top_k:
            keep &= row >= torch.topk(row, top_k).values[-1]
        masked = row.masked_fill(~keep, float("-inf"))
        if top_p < 1.0:
            probs = torch.softmax(masked, -1)
            order = torch.argsort(probs, descending=True)
            mass, kept = 0.0, torch.zeros_like(keep)
            for idx in order.tolist():
                kept[idx] = True
                mass += probs[idx].item()
                if mass >= top_p:
                    break
            keep &= kept
            masked = row.masked_fill(~keep, float("-inf"))
        if min_p > 0.0:
            probs = torch.softmax(masked, -1)
            keep &= probs >= min_p * probs.max()
            masked = row.masked_fill(~keep, float("-inf"))
        out.append(torch.log_softmax(masked, -1))
    return torch.stack(out)


# A split-bf16 head's analytic error (kernels/split_head.py) is at most ~2^-15 of sum_i |x_i w_i|
# per logit; the bound leaves as much again for fp32 accumulation. A plain bf16 head can be off
# by 2^-7 of that sum and in practice exceeds this bound by far.
SPLIT_HEAD_BOUND = 2.0 ** -14


def worst_relative_error(logits: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> float:
    """max over logits of |logits - x @ weight.T (fp64)| / sum_i |x_i w_i|; x [T, K], weight [V, K]."""
    x64, w64 = x.double(), weight.double()
    exact = x64 @ w64.T                                             # [T, V]
    scale = x64.abs() @ w64.abs().T                                 # [T, V]
    return ((logits.double() - exact).abs() / scale).max().item()
