"""Integration: the real default model (SmolLM2-135M-Instruct) against transformers."""
import asyncio

import pytest
import torch

from engine import LLM, AsyncEngine, EngineConfig, GenerateRequest, SamplingParams
from tests.engine.reference import hf_logits, processed_logprobs

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
    "import numpy as np\n\n# Compute the mean of a list",
]


def test_greedy_tokens_identical_to_transformers_generate(default_llm, hf_default_model):
    tok = default_llm.tokenizer
    params = SamplingParams(max_tokens=64, temperature=0.0)
    outs = default_llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([tok(prompt).input_ids])
        ref = hf_default_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,
                                        do_sample=False, pad_token_id=tok.eos_token_id)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist(), prompt


def test_raw_logprobs_match_transformers_forward(default_llm, hf_default_model):
    params = SamplingParams(max_tokens=48, temperature=0.8, seed=7, logprobs_mode="raw")
    for out in default_llm.generate(PROMPTS, params):
        ref = torch.log_softmax(hf_logits(hf_default_model, out.prompt_token_ids, out.token_ids), -1)
        want = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        assert (torch.tensor(out.logprobs) - want).abs().max().item() <= 1e-4


def test_processed_logprobs_match_reference_transforms(default_llm, hf_default_model):
    params = SamplingParams(max_tokens=48, temperature=0.7, top_p=0.9, top_k=40, seed=11)
    for out in default_llm.generate(PROMPTS, params):
        ref = processed_logprobs(hf_logits(hf_default_model, out.prompt_token_ids, out.token_ids),
                                 0.7, 40, 0.9)
        want = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        assert torch.isfinite(want).all()
        assert (torch.tensor(out.logprobs) - want).abs().max().item() <= 1e-4


def _mixed_requests(tok):
    # 16 requests of mixed prompt lengths (4 to ~150 tokens), greedy and seeded sampling.
    base = ("In the beginning the universe was created. This has made a lot of people very angry "
            "and been widely regarded as a bad move. ")
    prompts, params = [], []
    for i in range(16):
        prompts.append(PROMPTS[i % len(PROMPTS)] + " " + base * (i % 5))
        params.append(SamplingParams(max_tokens=12 + i, temperature=0.0) if i % 2 == 0 else
                      SamplingParams(max_tokens=12 + i, temperature=0.9, top_p=0.95, seed=i))
    return prompts, params


def test_batch_invariance_alone_together_and_under_preemption(default_llm, default_model_dir):
    prompts, params = _mixed_requests(default_llm.tokenizer)
    alone = [default_llm.generate([p], [sp])[0].token_ids for p, sp in zip(prompts, params)]
    together = [o.token_ids for o in default_llm.generate(prompts, params)]
    assert together == alone
    # A cache so small that the 16 cannot all run at once: sequences get preempted and recomputed.
    small = LLM(str(default_model_dir), num_kv_blocks=24, block_size=16, max_num_batched_tokens=128)
    squeezed = [o.token_ids for o in small.generate(prompts, params)]
    assert small.core.scheduler.num_preemptions > 0
    assert squeezed == alone
    assert small.core.blocks.num_free_blocks == small.core.blocks.num_blocks


def test_no_block_leaks_after_completion_and_abort(default_llm):
    core = default_llm.core
    default_llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0))
    assert core.blocks.num_free_blocks == core.blocks.num_blocks

    async def scenario():
        engine = AsyncEngine(core=core)                      # reuse the loaded core
        await engine.start()
        try:
            params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            ids = tuple(core.tokenizer(PROMPTS[0]).input_ids)
            streams = [engine.add_request(GenerateRequest(f"r{i}", ids, params)) for i in range(6)]
            # Abort r0 before its first step, r1 mid-generation (while a step runs), another by
            # leaving its iterator early; a short one finishes; then the rest are aborted.
            engine.abort("r0")
            got = 0
            async for delta in streams[1]:
                got += len(delta.token_ids)
                if got >= 3:
                    engine.abort("r1")        # lands while the next step is in flight
            gen = engine.generate(GenerateRequest("left-early", ids, params))
            async for _ in gen:
                break
            await gen.aclose()
            short = SamplingParams(max_tokens=5, temperature=0.0)
            async for _ in engine.add_request(GenerateRequest("short", ids, short)):
                pass
            for r in ("r2", "r3", "r4", "r5"):
                engine.abort(r)
            finishes = {}
            for s in streams:
                async for delta in s:
                    if delta.finish_reason is not None:
                        finishes[delta.request_id] = delta.finish_reason.value
            for _ in range(200):
                if not core.has_work():
                    break
                await asyncio.sleep(0.01)
            return finishes
        finally:
            await engine.shutdown()

    finishes = asyncio.run(scenario())
    assert set(finishes.values()) == {"abort"}
    assert not core.has_work()
    assert core.blocks.num_free_blocks == core.blocks.num_blocks
