"""The split-bf16 lm_head (kernels/split_head.py) in the engine: when `--head-precision auto`
picks it, and on the default model (SmolLM2-135M) its logits against an fp64 product and the
fp32 head, its greedy tokens and raw logprobs against a transformers fp32 forward."""
import pytest
import torch
from transformers import AutoTokenizer

from engine import LLM, EngineConfig, SamplingParams
from engine import model_runner
from kernels import LinearWeight, SplitHead, apply_linear, prepare_linear
from kernels.split_head import prepare_split_head, split_head_logits
from tests.engine.reference import SPLIT_HEAD_BOUND, hf_logits, worst_relative_error

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.mark.parametrize("asked, device, dtype, flags, wins, deterministic, want", [
    ("auto", "cpu", "bfloat16", {"amx_bf16", "avx512_bf16"}, True, False, "split-bf16"),
    ("auto", "cpu", "bfloat16", {"amx_bf16", "avx512_bf16"}, False, False, "fp32"),  # measured slower
    ("auto", "cpu", "bfloat16", {"avx512_bf16"}, True, False, "fp32"),               # no AMX
    ("auto", "cpu", "float32", {"amx_bf16"}, True, False, "fp32"),
    ("auto", "cpu", "float32", {"amx_bf16"}, True, True, "fp32"),
    ("auto", "cuda", "bfloat16", {"amx_bf16"}, True, False, "fp32"),
    ("split-bf16", "cpu", "float32", set(), False, False, "split-bf16"),
    ("fp32", "cpu", "bfloat16", {"amx_bf16"}, True, False, "fp32"),
])
def test_head_precision_auto_follows_the_cpu(monkeypatch, asked, device, dtype, flags, wins,
                                             deterministic, want):
    monkeypatch.setattr(model_runner, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(model_runner, "split_is_faster", lambda head, rows: (wins, 2.0, 1.0 + 2 * (not wins)))
    config = EngineConfig(head_precision=asked, deterministic=deterministic)
    got, reason = model_runner.choose_head_precision(config, device, dtype, torch.zeros(8, 4))
    assert got == want and reason
    assert (reason == "asked for") == (asked != "auto")


def test_split_head_is_refused_where_it_cannot_run():
    with pytest.raises(AssertionError, match="split-bf16"):
        EngineConfig(head_precision="split-bf16", deterministic=True)
    with pytest.raises(ValueError, match="CPU kernel"):
        model_runner.choose_head_precision(EngineConfig(head_precision="split-bf16"), "cuda",
                                           "float32", torch.zeros(8, 4))


@pytest.mark.slow
def test_split_head_logits_on_the_default_model(hf_default_model, default_model_dir):
    """The real head [49152, 576] on real final hidden states: within the analytic bound of an
    fp64 product (as the fp32 head is), which a plain bf16 head exceeds; and within a few fp32
    ulps of the fp32 head."""
    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    ids = torch.tensor([tok("\n".join(PROMPTS)).input_ids])
    with torch.inference_mode():
        hidden = hf_default_model.model(ids).last_hidden_state[0].float()     # [T, 576], normed
    weight = hf_default_model.lm_head.weight.detach().float()                # [49152, 576]
    split = split_head_logits(hidden, prepare_split_head(weight))
    fp32 = apply_linear(hidden, prepare_linear(weight.clone()))
    assert worst_relative_error(split, hidden, weight) <= SPLIT_HEAD_BOUND
    assert worst_relative_error(fp32, hidden, weight) <= SPLIT_HEAD_BOUND
    bf16 = hidden.bfloat16().float() @ weight.bfloat16().float().T            # the negative control
    assert worst_relative_error(bf16, hidden, weight) > 4 * SPLIT_HEAD_BOUND
    # in absolute terms: logits of magnitude ~20, the split off the fp32 head by ~1e-5, bf16 by ~0.1
    assert (split - fp32).abs().max().item() < 1e-3 < (bf16 - fp32).abs().max().item()
    assert torch.equal(split.argmax(-1), fp32.argmax(-1))


@pytest.mark.slow
def test_split_head_engine_matches_transformers_fp32(hf_default_model):
    """The engine with the split head: the parity tests' tolerance (raw logprobs within 1e-4 of
    a transformers fp32 forward) and greedy tokens equal to transformers' generate."""
    llm = LLM(head_precision="split-bf16")
    assert isinstance(llm.core.runner.model.lm_head, SplitHead)
    assert llm.core.runner.head_reason == "asked for"
    tok = llm.tokenizer
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0))
    for prompt, out in zip(PROMPTS, greedy):
        ids = torch.tensor([tok(prompt).input_ids])
        ref = hf_default_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                        do_sample=False, pad_token_id=tok.eos_token_id)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist(), prompt
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=7, logprobs_mode="raw")
    for out in llm.generate(PROMPTS, params):
        ref = torch.log_softmax(hf_logits(hf_default_model, out.prompt_token_ids, out.token_ids), -1)
        want = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        assert (torch.tensor(out.logprobs) - want).abs().max().item() <= 1e-4


def test_default_head_is_fp32_on_an_fp32_body(tiny_model_dir):
    llm = LLM(str(tiny_model_dir))
    assert isinstance(llm.core.runner.model.lm_head, LinearWeight)
    assert llm.core.runner.head_precision == "fp32" and "fp32" in llm.core.runner.head_reason
