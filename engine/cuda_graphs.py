"""CUDA graphs for decode steps: the forward pass and the lm_head of a batch of one-token
decodes, captured once per batch size at start-up and replayed, so a small model's decode step
costs one launch instead of a few hundred Python-issued kernels.

UNTESTED on a GPU as of this writing (no GPU was at hand): `benchmarks/gpu_check.sh` runs the
engine parity tests on cuda with graphs on (the default) and off. Nothing here runs on the CPU.

A step is replayed when every sequence decodes one token and samples it, and its block tables
fit the captured width; it is padded up to the next captured size with rows that store nothing
(slot -1) and attend to one key. Anything else (prefill chunks, fast-forwarded tokens, a batch
larger than the largest size) runs eagerly. The graphs read fixed memory: the step's inputs are
copied into the static buffers below (device to device), the KV cache and the weights are the
runner's own, which is why a weight swap captures again (ModelRunner.swap_model).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
import torch

from kernels import AttentionMetadata

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner

log = structlog.get_logger("plumbline.engine")


def batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes captured: 1, 2, 4, 8, then every 16 up to max_num_seqs."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += range(16, max_num_seqs, 16)
    return sorted(set(sizes) | {max_num_seqs})


class CudaGraphs:
    def __init__(self, runner: ModelRunner, sizes: list[int], max_blocks: int) -> None:
        self.runner = runner
        self.sizes = sizes
        self.max_blocks = max_blocks
        n, dev = sizes[-1], runner.device
        # Static inputs [max size]; padding rows: slot -1 (nothing stored), one key seen.
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}   # size -> graph, hidden, logits

    @classmethod
    def capture(cls, runner: ModelRunner) -> CudaGraphs | None:
        """Capture every size (largest first, one memory pool); None, logged, if capture fails:
        the engine then runs every step eagerly."""
        config = runner.config
        max_len = min(config.max_model_len or runner.max_position_embeddings,
                      runner.num_blocks * runner.block_size)
        graphs = cls(runner, batch_sizes(config.max_num_seqs), -(-max_len // runner.block_size))
        try:
            pool = None
            for size in reversed(graphs.sizes):
                pool = graphs._capture(size, pool)
        except Exception as exc:   # noqa: BLE001: an eager engine is still an engine
            log.warning("cuda_graphs_failed", error=f"{type(exc).__name__}: {exc}")
            return None
        log.info("cuda_graphs_captured", sizes=graphs.sizes, max_blocks=graphs.max_blocks)
        return graphs

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:size], num_decodes=size,
                                 block_tables=self.block_tables[:size],
                                 seq_lens=self.seq_lens[:size],
                                 query_start_loc=self.query_start_loc[:size + 1], max_query_len=1)

    def _step(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.runner.model
        hidden = model.forward(self.input_ids[:size], self.positions[:size],
                               self.runner.kv_caches, self._meta(size))     # [size, hidden]
        return hidden, model.compute_logits(hidden)                         # [size, vocab] fp32

    def _capture(self, size: int, pool: Any) -> Any:
        # Warm up on a side stream first: Triton compiles its kernels and cuBLAS picks its
        # algorithms on a first call, neither of which may happen during capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(size)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden, logits = self._step(size)
        self.graphs[size] = (graph, hidden, logits)
        return graph.pool()

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            num_sampled: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden [T, hidden], logits [T, vocab]) of a replayed decode step; None: run it eagerly."""
        n = input_ids.shape[0]
        width = meta.block_tables.shape[1]
        if not (meta.num_decodes == n == num_sampled == meta.seq_lens.numel()
                and n <= self.sizes[-1] and width <= self.max_blocks):
            return None
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)               # device to device, no host wait
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:size].fill_(1)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        graph, hidden, logits = self.graphs[size]
        graph.replay()
        return hidden[:n], logits[:n]
