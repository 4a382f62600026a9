"""The engine through its Triton kernels, on the CPU: `PLUMBLINE_KERNELS=triton` with
`TRITON_INTERPRET=1` sends every op that has a Triton kernel (paged attention, rotary, the KV
store, RMSNorm, the bitmask apply) through it, by the same dispatch a CUDA tensor takes, and the
runner moves data through the same Transfer calls it makes on cuda (engine/device.py). The tiny
model and the default model give the default CPU path's tokens and logprobs (1e-4) and
transformers' greedy tokens, batch invariance holds, no KV block is left held, and a step reads
results back to the host once. What needs a GPU (compiled kernels, CUDA graphs, pinned memory,
stream order) is not covered here: benchmarks/gpu_check.sh runs tests/engine/test_cuda.py."""
from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLM, SamplingParams
from engine.device import Transfer
from engine.model_runner import ModelRunner
from grammars import GrammarSpec
from kernels import backend

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Hello there, how are you doing today?", "1 2 3 4 5 6 7 8 9 10", "Why", "Dear diary,"]
PARAMS = [SamplingParams(max_tokens=6, temperature=0.0, logprobs=2),
          SamplingParams(max_tokens=6, temperature=0.9, seed=4, logprobs=2),
          SamplingParams(max_tokens=6, temperature=0.0, grammar=GrammarSpec.choice(["yes", "no"])),
          SamplingParams(max_tokens=6, temperature=0.8, seed=9, n=2, min_tokens=2,
                         repetition_penalty=1.2)]
KERNELS = {"_paged_attention_kernel", "_rotary_kernel", "_store_kvcache_kernel",
           "_rms_norm_kernel", "_bitmask_kernel"}


def run(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> list[list[tuple]]:
    return [[(o.token_ids, o.logprobs) for o in out.outputs]
            for out in llm.generate(prompts, params)]


def assert_same(got: list[list[tuple]], want: list[list[tuple]], tol: float = 1e-4) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [ids for ids, _ in g] == [ids for ids, _ in w]
        diffs = [abs(a - b) for (_, lps), (_, wlps) in zip(g, w) for a, b in zip(lps, wlps)]
        assert max(diffs) <= tol


class HostReads:
    """While ModelRunner.run runs: read_back calls, and every host read of a tensor (item,
    tolist, cpu, bool/int/float, torch.cuda.synchronize) made by our packages' code on a tensor
    read_back did not return. On cuda each such read would synchronise the step again."""

    NAMES = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__")

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.steps = self.sampling_steps = self.read_backs = 0
        self.stray: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.host: set[int] = set()          # ids of the tensors the last read_back returned
        self.in_step = False
        run_step, read_back = ModelRunner.run, Transfer.read_back

        def step(runner: ModelRunner, batch: Any) -> Any:
            self.in_step, self.host = True, set()
            try:
                result = run_step(runner, batch)
            finally:
                self.in_step = False
            self.steps += 1
            self.sampling_steps += bool(result.token_ids)
            return result

        def back(transfer: Transfer, *tensors: Any) -> Any:
            out = read_back(transfer, *tensors)
            self.read_backs += 1
            self.host |= {id(t) for t in out if t is not None}
            return out

        mp.setattr(ModelRunner, "run", step)
        mp.setattr(Transfer, "read_back", back)
        for name in self.NAMES:
            mp.setattr(torch.Tensor, name, self.watch(name, getattr(torch.Tensor, name)))
        mp.setattr(torch.cuda, "synchronize", self.watch("synchronize", torch.cuda.synchronize))

    def watch(self, name: str, original: Any) -> Any:
        def read(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code
            path = Path(caller.co_filename)
            if (self.in_step and path.is_relative_to(ROOT) and path.parts[len(ROOT.parts)]
                    in ("engine", "kernels", "grammars")
                    and not (args and id(args[0]) in self.host)):
                self.stray[(str(path.relative_to(ROOT)), caller.co_name, name)] += 1
            return original(*args, **kwargs)
        return read


@pytest.fixture(scope="module")
def tiny_runs(tiny_model_dir: Path) -> dict[str, Any]:
    """One run of the workload on the default CPU path and one through the Triton kernels
    (interpreted, with launches and host reads counted), then one request alone."""
    default = run(LLM(str(tiny_model_dir)), PROMPTS, PARAMS)
    launches: collections.Counter[str] = collections.Counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLUMBLINE_KERNELS", "triton")
        mp.setenv("TRITON_INTERPRET", "1")
        original = backend.LazyKernel.__getitem__

        def launch(kernel: Any, grid: Any) -> Any:
            launches[kernel.__name__] += 1
            return original(kernel, grid)
        mp.setattr(backend.LazyKernel, "__getitem__", launch)
        llm = LLM(str(tiny_model_dir))
        reads = HostReads(mp)
        triton = run(llm, PROMPTS, PARAMS)
        alone = run(llm, PROMPTS[1:2], PARAMS[1:2])[0]
    return {"default": default, "triton": triton, "alone": alone, "llm": llm,
            "launches": launches, "reads": reads}


def test_whole_engine_through_the_triton_kernels(tiny_runs):
    assert KERNELS <= set(tiny_runs["launches"]), tiny_runs["launches"]
    assert_same(tiny_runs["triton"], tiny_runs["default"])
    # batch invariance of seeded sampling on this path: alone as in the batch
    assert [ids for ids, _ in tiny_runs["alone"]] == [ids for ids, _ in tiny_runs["triton"][1]]
    llm = tiny_runs["llm"]
    blocks = llm.core.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not llm.core.has_work()


def test_a_step_reads_the_device_once(tiny_runs):
    """The one synchronisation of a step is read_back (sampled ids, logprobs, top-N); no other
    host read of a step tensor happens in engine/, kernels/ or grammars/ (greedy, seeded,
    grammar-masked, penalised and min_tokens rows all in the batch)."""
    reads = tiny_runs["reads"]
    assert reads.steps >= 6 and reads.sampling_steps == reads.steps
    assert reads.read_backs == reads.sampling_steps
    assert dict(reads.stray) == {}


@pytest.mark.slow
def test_default_model_through_the_triton_kernels(default_llm, hf_default_model, monkeypatch):
    prompts = ["The capital of France is", "def add(a, b):"]
    # two tokens each: a prefill step and a decode step, 30 layers interpreted (about a minute)
    params = [SamplingParams(max_tokens=2, temperature=0.0, logprobs=1),
              SamplingParams(max_tokens=2, temperature=0.7, seed=3)]
    default = run(default_llm, prompts, params)
    monkeypatch.setenv("PLUMBLINE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    llm = LLM()
    triton = run(llm, prompts, params)
    assert_same(triton, default)
    ids = torch.tensor([llm.tokenizer(prompts[0]).input_ids])
    ref = hf_default_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                                    do_sample=False, pad_token_id=llm.tokenizer.eos_token_id)
    assert triton[0][0][0] == ref[0, ids.shape[1]:].tolist()
    assert_same(run(llm, prompts[1:], params[1:]), triton[1:], tol=1e-5)   # batch invariance
    blocks = llm.core.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not llm.core.has_work()
