"""engine/cuda_graphs.py's replay logic on the CPU, with a stand-in for the captured graph: its
`replay` runs the same forward pass on the static buffers eagerly. That checks what the GPU
would otherwise be the first to see: which steps replay, how a step's inputs are copied into the
static buffers, that padding rows store nothing and read one key, and the size chosen; tokens
and logprobs equal eager steps'. Capture itself (streams, memory pools, Triton under capture)
needs a GPU: tests/engine/test_cuda.py."""
from __future__ import annotations

from typing import Any

import pytest

from engine import LLM, GenerateRequest, SamplingParams
from engine.cuda_graphs import CudaGraphs

PROMPTS = ["Hello there, how are you doing today?", "1 2 3", "Why", "Dear diary, today I",
           "The quick brown fox"]
PARAMS = [SamplingParams(max_tokens=8, temperature=0.0, logprobs=1),
          SamplingParams(max_tokens=8, temperature=0.8, seed=1),
          SamplingParams(max_tokens=3, temperature=0.0),        # finishes early: sizes change
          SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
          SamplingParams(max_tokens=6, temperature=0.7, seed=2, logprobs=2)]


class StandIn:
    """Replays by running the captured step again, writing into the captured outputs."""

    def __init__(self, graphs: CudaGraphs, size: int) -> None:
        self.graphs, self.size = graphs, size
        self.hidden, self.logits = graphs._step(size)
        self.num_replays = 0

    def replay(self) -> None:
        hidden, logits = self.graphs._step(self.size)
        self.hidden.copy_(hidden)
        self.logits.copy_(logits)
        self.num_replays += 1


def outputs(llm: LLM) -> list[tuple[list[int], list[float]]]:
    return [(o.token_ids, o.logprobs) for o in llm.generate(PROMPTS, PARAMS)]


def test_decode_steps_replay_into_padded_static_buffers(tiny_model_dir, monkeypatch):
    eager = outputs(LLM(str(tiny_model_dir), max_num_seqs=6))

    def capture(graphs: CudaGraphs, size: int, pool: Any) -> None:
        stand_in = StandIn(graphs, size)
        graphs.graphs[size] = (stand_in, stand_in.hidden, stand_in.logits)
    monkeypatch.setattr(CudaGraphs, "_capture", capture)
    llm = LLM(str(tiny_model_dir), max_num_seqs=6)
    runner = llm.core.runner
    runner.graphs = graphs = CudaGraphs.capture(runner)
    assert graphs is not None and graphs.sizes == [1, 2, 4, 6]
    assert graphs.max_blocks == runner.max_position_embeddings // runner.block_size
    replayed = outputs(llm)
    for (ids, lps), (want_ids, want_lps) in zip(replayed, eager, strict=True):
        assert ids == want_ids
        assert lps == pytest.approx(want_lps, abs=1e-5)
    replays = {size: g.num_replays for size, (g, _, _) in graphs.graphs.items()}
    assert replays[6] >= 1 and replays[4] >= 1          # 5 decodes padded to 6, then fewer
    blocks = llm.core.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not llm.core.has_work()


def test_steps_that_are_not_plain_decodes_run_eagerly(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(CudaGraphs, "_capture", lambda graphs, size, pool: None)
    llm = LLM(str(tiny_model_dir), max_num_seqs=4)
    graphs = CudaGraphs.capture(llm.core.runner)
    runner = llm.core.runner
    scheduler = llm.core.scheduler
    llm.core.add_request(GenerateRequest("r", tuple(range(5, 25)),
                                         SamplingParams(max_tokens=4, temperature=0.0)))
    prefill = scheduler.schedule()
    ids, positions, meta, rows = runner.prepare(prefill)
    assert graphs.run(ids, positions, meta, len(rows)) is None          # a prefill
    scheduler.postprocess(prefill, llm.core.run(prefill))
    decode = scheduler.schedule()
    ids, positions, meta, rows = runner.prepare(decode)
    assert graphs.run(ids, positions, meta, 0) is None                  # a row that does not sample
    graphs.max_blocks = 1                                               # tables wider than captured
    assert graphs.run(ids, positions, meta, len(rows)) is None
