"""On a tiny random llama: the bf16 body against a transformers bf16 forward (with our fp32
lm_head), deterministic mode in bf16, and `LLM.update_weights` offline."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.loader import load_state_dict
from kernels import LinearWeight, SplitHead
from tests.conftest import make_tiny_llama
from tests.engine.reference import hf_logits

PROMPTS = ["Hello there, how are you doing today?", "1 2 3 4 5 6 7 8 9 10 11 12 13 14"]
RAW = SamplingParams(max_tokens=8, temperature=0.0, logprobs_mode="raw", ignore_eos=True)


@pytest.fixture(scope="module")
def wide(tmp_path_factory, default_model_dir):
    # Wide init: logits spread out, so greedy choices do not hinge on bf16 near-ties.
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-bf16"), default_model_dir,
                           initializer_range=0.2)


def test_bf16_body_follows_transformers_in_bf16(wide):
    """Teacher-forced on our own tokens, the bf16 body's raw logprobs stay within bf16 rounding
    of transformers' bf16 forward (whose lm_head also ran in bf16; ours runs in fp32)."""
    hf = AutoModelForCausalLM.from_pretrained(str(wide), dtype=torch.bfloat16).eval()
    llm = LLM(str(wide), dtype="bfloat16", max_num_batched_tokens=16)
    for out in llm.generate(PROMPTS, RAW):
        ref = torch.log_softmax(hf_logits(hf, out.prompt_token_ids, out.token_ids), -1)
        want = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        assert (torch.tensor(out.logprobs) - want).abs().max().item() < 0.1
        # most greedy choices agree with transformers' argmax (bf16 may flip a close pair)
        agree = sum(a == b for a, b in zip(out.token_ids, ref.argmax(-1).tolist()))
        assert agree >= len(out.token_ids) - 2


def test_bf16_deterministic_mode_is_batch_invariant(wide):
    llm = LLM(str(wide), dtype="bfloat16", deterministic=True, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=5, logprobs=2)
    alone = [llm.generate([p], params)[0].outputs[0] for p in PROMPTS]
    together = [o.outputs[0] for o in llm.generate(PROMPTS * 3, params)]
    for i, o in enumerate(together):
        a = alone[i % len(PROMPTS)]
        assert (o.token_ids, o.logprobs) == (a.token_ids, a.logprobs)


@pytest.mark.parametrize("head_precision", ["fp32", "split-bf16"])
def test_update_weights_offline(wide, head_precision):
    """New weights take effect at once, tokens report the new version, and the outputs are
    those of a transformers forward of the new weights (the lm_head prepared again, split or
    not); mismatched shapes are refused and the old weights keep serving."""
    llm = LLM(str(wide), max_num_batched_tokens=64, head_precision=head_precision)
    before = llm.generate(PROMPTS, RAW)
    state = load_state_dict(wide)
    g = torch.Generator().manual_seed(1)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    assert llm.update_weights(new) == 1
    split = head_precision == "split-bf16"
    assert isinstance(llm.core.runner.model.lm_head, SplitHead if split else LinearWeight)
    after = llm.generate(PROMPTS, RAW)
    assert [o.token_ids for o in after] != [o.token_ids for o in before]
    assert all(set(o.outputs[0].weights_versions) == {1} for o in after)
    hf = AutoModelForCausalLM.from_pretrained(str(wide), dtype=torch.float32).eval()
    hf.load_state_dict(new, strict=False)
    for out in after:
        ref = torch.log_softmax(hf_logits(hf, out.prompt_token_ids, out.token_ids), -1)
        assert out.token_ids == ref.argmax(-1).tolist()
    bad = dict(new)
    bad["model.embed_tokens.weight"] = bad["model.embed_tokens.weight"][:, :8].contiguous()
    with pytest.raises(ValueError, match="shape"):
        llm.update_weights(bad)
    again = llm.generate(PROMPTS, RAW)
    assert [o.token_ids for o in again] == [o.token_ids for o in after]


@pytest.mark.parametrize("native, deterministic, want", [
    (["avx512_bf16"], False, "bfloat16"), (["amx_bf16", "avx512_bf16"], False, "bfloat16"),
    ([], False, "float32"), (["amx_bf16"], True, "float32")])
def test_dtype_auto_follows_the_cpu(monkeypatch, native, deterministic, want):
    from engine import EngineConfig
    from engine import model_runner
    monkeypatch.setattr(model_runner, "native_bf16", lambda: native)
    dtype, reason = model_runner.choose_dtype(EngineConfig(dtype="auto", deterministic=deterministic))
    assert dtype == want and reason
    assert all(flag in reason for flag in native) or deterministic
    assert model_runner.choose_dtype(EngineConfig(dtype="float32")) == ("float32", "asked for")


def test_dtype_auto_loads_and_reports_its_choice(wide):
    from engine import AsyncEngine, EngineConfig
    from kernels.backend import native_bf16
    engine = AsyncEngine(EngineConfig(model=str(wide), dtype="auto"))
    info = engine.server_info()
    assert info["dtype"] == ("bfloat16" if native_bf16() else "float32") and info["dtype_reason"]
    assert info["lm_head_dtype"] == "float32"                     # the head stays fp32
