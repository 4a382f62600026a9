"""The engine through its Triton kernels, on the CPU: `PLUMBLINE_KERNELS=triton` with
`TRITON_INTERPRET=1` sends every op that has a Triton kernel (paged attention, rotary, the KV
store, RMSNorm, the bitmask apply) through it, by the same dispatch a CUDA tensor takes. The
tiny model gives the default CPU path's tokens and logprobs (1e-4), batch invariance holds for
seeded sampling, and no KV block is left held. What needs a GPU (compiled kernels, CUDA
graphs, streams, pinned memory) is not covered here."""
from __future__ import annotations

import collections

import pytest

from engine import LLM, SamplingParams
from grammars import GrammarSpec
from kernels import backend

PROMPTS = ["Hello there, how are you doing today?", "1 2 3 4 5 6 7 8 9 10", "Why", "Dear diary,"]
PARAMS = [SamplingParams(max_tokens=6, temperature=0.0, logprobs=2),
          SamplingParams(max_tokens=6, temperature=0.9, seed=4, logprobs=2),
          SamplingParams(max_tokens=6, temperature=0.0, grammar=GrammarSpec.choice(["yes", "no"])),
          SamplingParams(max_tokens=6, temperature=0.8, seed=9, n=2)]


def run(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> list[list[tuple]]:
    return [[(o.token_ids, o.logprobs) for o in out.outputs]
            for out in llm.generate(prompts, params)]


@pytest.fixture()
def launches(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Triton kernel launches by name, while the test runs the interpreter path."""
    seen: collections.Counter[str] = collections.Counter()
    original = backend.LazyKernel.__getitem__

    def launch(self, grid):  # type: ignore[no-untyped-def]
        seen[self.__name__] += 1
        return original(self, grid)
    monkeypatch.setattr(backend.LazyKernel, "__getitem__", launch)
    return seen


def test_whole_engine_through_the_triton_kernels(tiny_model_dir, monkeypatch, launches):
    default = run(LLM(str(tiny_model_dir)), PROMPTS, PARAMS)
    monkeypatch.setenv("PLUMBLINE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    llm = LLM(str(tiny_model_dir))
    triton = run(llm, PROMPTS, PARAMS)
    assert {"_paged_attention_kernel", "_rotary_kernel", "_store_kvcache_kernel",
            "_rms_norm_kernel", "_bitmask_kernel"} <= set(launches), launches
    for got, want in zip(triton, default):
        for (ids, lps), (want_ids, want_lps) in zip(got, want):
            assert ids == want_ids
            assert max((abs(a - b) for a, b in zip(lps, want_lps)), default=0.0) <= 1e-4
    # batch invariance of seeded sampling on this path: alone as in the batch
    alone = run(llm, PROMPTS[1:2], PARAMS[1:2])[0]
    assert [ids for ids, _ in alone] == [ids for ids, _ in triton[1]]
    blocks = llm.core.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not llm.core.has_work()
