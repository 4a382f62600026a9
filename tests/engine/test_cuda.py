"""The engine on a CUDA GPU (skips without one; benchmarks/gpu_check.sh runs these). Written
without a GPU at hand: none of these has run yet.

The default model in fp32 on cuda gives the CPU path's greedy tokens (logprobs within 1e-3:
cuBLAS and our GEMM sum in different orders); CUDA graph replay gives what eager steps give;
seeded sampling does not depend on the batch; no block is left held; and a step synchronises
once (torch's sync debug mode raises on any other synchronising call inside the step).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import LLM, SamplingParams
from engine.device import Transfer
from engine.model_runner import ModelRunner
from grammars import GrammarSpec

pytestmark = [pytest.mark.cuda, pytest.mark.slow]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, logprobs=2)


@pytest.fixture(scope="module", autouse=True)
def gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def outputs(llm: LLM, prompts: list[str], params: Any) -> list[tuple[list[int], list[float]]]:
    return [(o.token_ids, o.logprobs) for o in llm.generate(prompts, params)]


def assert_close(got: list, want: list, tol: float) -> None:
    for (ids, lps), (want_ids, want_lps) in zip(got, want, strict=True):
        assert ids == want_ids
        assert max(abs(a - b) for a, b in zip(lps, want_lps)) <= tol


def no_leaks(llm: LLM) -> None:
    blocks = llm.core.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not llm.core.has_work()


@pytest.fixture(scope="module")
def fp32_graphs() -> LLM:
    return LLM(device="cuda", dtype="float32", max_num_seqs=8)


def test_fp32_on_cuda_matches_the_cpu_path(default_llm, fp32_graphs):
    runner = fp32_graphs.core.runner
    assert runner.device.type == "cuda" and runner.kv_caches[0][0].is_cuda
    assert runner.graphs is not None and runner.graphs.sizes == [1, 2, 4, 8]
    assert_close(outputs(fp32_graphs, PROMPTS, GREEDY), outputs(default_llm, PROMPTS, GREEDY), 1e-3)
    no_leaks(fp32_graphs)


def test_graph_replay_gives_what_eager_steps_give(fp32_graphs):
    eager = LLM(device="cuda", dtype="float32", max_num_seqs=8, enable_cuda_graphs=False)
    assert eager.core.runner.graphs is None
    replays = []
    graphs = fp32_graphs.core.runner.graphs
    original = graphs.run

    def counted(*args: Any) -> Any:
        out = original(*args)
        replays.append(out is not None)
        return out
    graphs.run = counted
    params = [GREEDY, SamplingParams(max_tokens=16, temperature=0.8, seed=5, logprobs=1)] * 3
    prompts = PROMPTS * 2
    assert_close(outputs(fp32_graphs, prompts, params), outputs(eager, prompts, params), 1e-4)
    assert sum(replays) >= 10         # decode steps replayed; prefills ran eagerly
    no_leaks(fp32_graphs)


def test_seeded_sampling_does_not_depend_on_the_batch(fp32_graphs):
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=11)
    batch = outputs(fp32_graphs, PROMPTS, params)
    alone = outputs(fp32_graphs, PROMPTS[1:2], params)
    assert alone[0][0] == batch[1][0]


def test_bf16_is_the_default_on_cuda_with_an_fp32_lm_head(default_llm):
    llm = LLM(device="cuda", dtype="auto", max_num_seqs=4)
    runner = llm.core.runner
    assert runner.dtype == torch.bfloat16 and runner.model.lm_head.dtype == torch.float32
    got = outputs(llm, PROMPTS[:1], SamplingParams(max_tokens=1, temperature=0.0))
    assert got[0][0] == outputs(default_llm, PROMPTS[:1], SamplingParams(max_tokens=1,
                                                                         temperature=0.0))[0][0]
    no_leaks(llm)


def test_a_step_synchronises_once(fp32_graphs, monkeypatch):
    """Greedy, seeded, top-N and grammar-masked rows. Penalties, logit_bias, min_tokens and raw
    logprobs index rows with lists (a blocking copy each) and are left out: known syncs."""
    params = [GREEDY, SamplingParams(max_tokens=8, temperature=0.7, seed=2, logprobs=3),
              SamplingParams(max_tokens=8, temperature=0.0,
                             grammar=GrammarSpec.choice(["yes", "no"]))]
    outputs(fp32_graphs, PROMPTS, params)                 # compile and capture everything first
    run_step, read_back = ModelRunner.run, Transfer.read_back
    read_backs = []

    def step(runner: ModelRunner, batch: Any) -> Any:
        torch.cuda.set_sync_debug_mode("error")
        try:
            return run_step(runner, batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def back(transfer: Transfer, *tensors: Any) -> Any:
        torch.cuda.set_sync_debug_mode(0)
        try:
            read_backs.append(1)
            return read_back(transfer, *tensors)
        finally:
            torch.cuda.set_sync_debug_mode("error")
    monkeypatch.setattr(ModelRunner, "run", step)
    monkeypatch.setattr(Transfer, "read_back", back)
    outputs(fp32_graphs, PROMPTS, params)
    assert len(read_backs) >= 8
    no_leaks(fp32_graphs)
