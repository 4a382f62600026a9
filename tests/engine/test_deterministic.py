"""Deterministic mode: tokens and logprobs bit-identical for a request alone, among many others,
and under forced preemption."""
import pytest

from engine import LLM, SamplingParams

BASE = ("In the beginning the universe was created. This has made a lot of people very angry "
        "and been widely regarded as a bad move. ")
STARTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "Dear diary,"]


def requests(count: int, max_tokens: int):
    prompts, params = [], []
    for i in range(count):
        prompts.append(STARTS[i % 4] + " " + BASE * (i % 4))
        params.append(SamplingParams(max_tokens=max_tokens + i % 7, temperature=0.0, logprobs=2)
                      if i % 2 == 0 else
                      SamplingParams(max_tokens=max_tokens + i % 7, temperature=0.9, top_p=0.95,
                                     seed=i, logprobs=2))
    return prompts, params


def signature(out):
    o = out.outputs[0]
    return o.token_ids, o.logprobs, [[(t.token_id, t.logprob) for t in row] for row in o.top_logprobs]


def check_invariance(model_dir, count, max_tokens, small_blocks):
    prompts, params = requests(count, max_tokens)
    llm = LLM(str(model_dir), deterministic=True, max_num_batched_tokens=96)
    alone = [signature(llm.generate([p], [sp])[0]) for p, sp in zip(prompts, params)]
    together = [signature(o) for o in llm.generate(prompts, params)]
    assert together == alone
    squeezed_llm = LLM(str(model_dir), deterministic=True, max_num_batched_tokens=96,
                       num_kv_blocks=small_blocks, block_size=16)
    squeezed = [signature(o) for o in squeezed_llm.generate(prompts, params)]
    assert squeezed_llm.core.scheduler.num_preemptions > 0
    assert squeezed == alone


def test_tiny_model_bit_identical_alone_batched_preempted(tiny_model_dir):
    check_invariance(tiny_model_dir, count=16, max_tokens=12, small_blocks=14)


@pytest.mark.slow
def test_default_model_bit_identical_alone_batched_preempted(default_model_dir):
    check_invariance(default_model_dir, count=6, max_tokens=6, small_blocks=8)

