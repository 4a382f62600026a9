"""Weights, KV cache and the step: prepare inputs -> forward -> logits (fp32) -> sample."""
from __future__ import annotations

import concurrent.futures
import os
import random
from pathlib import Path

import structlog
import torch
from transformers import AutoConfig

from engine.config import EngineConfig
from engine.cpu_bind import CpuBinding, choose_binding, wait_policy_warning
from engine.cuda_graphs import CudaGraphs
from engine.device import Transfer, choose_device, cuda_bf16
from engine.loader import load_state_dict
from engine.model import LlamaModel, head_weight
from engine.sampler import INVARIANT, TORCH, SamplingBatch, sample
from engine.sequence import Sequence
from engine.types import EMPTY_RESULT, Batch, PromptLogprob, StepResult, TopLogprob
from grammars import fill_bitmasks
from grammars.steering import Steering
from kernels import AttentionMetadata, LinearWeight, slots_for, warm_up
from kernels.affinity import pin_team
from kernels.backend import cpu_flags, native_bf16
from kernels.calibrate import calibrate, calibrate_panels
from kernels.linear import NEVER, below, keep_onednn_copy
from kernels.split_head import split_is_faster

log = structlog.get_logger("plumbline.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def choose_dtype(config: EngineConfig, device: str = "cpu") -> tuple[str, str]:
    """The body's dtype for config.dtype on the device, and why."""
    if config.dtype != "auto":
        return config.dtype, "asked for"
    if device == "cuda":
        if cuda_bf16():
            return "bfloat16", "the GPU computes bf16 natively"
        return "float32", "the GPU has no native bf16 (before Ampere)"
    if config.deterministic:
        return "float32", "deterministic mode computes every op in fp32 (a bf16 body only adds roundings)"
    native = native_bf16()
    if native:
        return "bfloat16", f"the CPU computes bf16 natively ({', '.join(native)})"
    return "float32", "the CPU has no native bf16 (no AMX, no AVX512-BF16): fp32 is faster"


def choose_head_precision(config: EngineConfig, device: str, dtype: str,
                          head: torch.Tensor) -> tuple[str, str]:
    """How the lm_head computes its logits (both ways fp32-accurate: kernels/split_head.py), and
    why. Where it could go either way it times both on `head` [vocab, hidden], well under a
    second: the split head keeps twice the fp32 head's bytes, so AMX alone does not settle it."""
    if config.head_precision == "split-bf16" and device != "cpu":
        raise ValueError("--head-precision split-bf16 is a CPU kernel; the model runs on " + device)
    if config.head_precision != "auto":
        return config.head_precision, "asked for"
    if device != "cpu":
        return "fp32", "the split head is a CPU kernel"
    if config.deterministic:
        return "fp32", "deterministic mode's lm_head is its batch-invariant fp32 kernel"
    if dtype != "bfloat16":
        return "fp32", "the body is fp32 (the split head is for CPUs that compute in bf16)"
    if "amx_bf16" not in cpu_flags():
        return "fp32", "the CPU has no AMX: oneDNN computes the split head's products in fp32"
    rows = min(config.max_num_seqs, 32)
    wins, fp32_ms, split_ms = split_is_faster(head, rows)
    timing = f"{split_ms:.1f} ms against {fp32_ms:.1f} ms in fp32 for {rows} rows, measured at load"
    return ("split-bf16", f"AMX: {timing}") if wins else ("fp32", f"AMX, but split-bf16 {timing}")


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.hf_config = AutoConfig.from_pretrained(str(model_dir))
        if self.hf_config.model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"model type {self.hf_config.model_type!r} is not llama-family")
        self.device_name, self.device_reason = choose_device(config)
        self.device = torch.device(self.device_name)
        self.transfer = Transfer(self.device)
        log.info("device_chosen", device=self.device_name, asked=config.device,
                 reason=self.device_reason)
        # This runs on the compute thread: its OpenMP team is the one every step uses.
        self.cpu_binding = (choose_binding(config.cpu_bind, config.num_threads)
                            if self.device.type == "cpu" else CpuBinding((), (), "not on the CPU"))
        if self.cpu_binding.team_cpus:
            pin_team(list(self.cpu_binding.team_cpus))
        self.num_threads = torch.get_num_threads()
        log.info("cpu_bind", team_cpus=list(self.cpu_binding.team_cpus),
                 loop_cpus=list(self.cpu_binding.loop_cpus), asked=config.cpu_bind,
                 num_threads=self.num_threads, reason=self.cpu_binding.reason)
        if self.device.type == "cpu" and (warning := wait_policy_warning()):
            log.warning("omp_wait_policy", problem=warning)
        self.dtype_name, self.dtype_reason = choose_dtype(config, self.device_name)
        self.dtype = _DTYPES[self.dtype_name]
        log.info("dtype_chosen", dtype=self.dtype_name, asked=config.dtype, reason=self.dtype_reason)
        state = load_state_dict(model_dir)
        self.head_precision, self.head_reason = choose_head_precision(
            config, self.device_name, self.dtype_name, head_weight(state))
        log.info("head_precision_chosen", head_precision=self.head_precision,
                 asked=config.head_precision, reason=self.head_reason)
        self.model = LlamaModel(self.hf_config, state, self.dtype, config.deterministic,
                                self.device, self.head_precision)
        del state                # the model holds what it needs; the rest can be freed
        on_cpu = self.device.type == "cpu"
        if on_cpu and self.dtype == torch.bfloat16 and not config.deterministic:
            # From how many rows oneDNN's bf16 product beats our small-product kernel depends
            # on the CPU (kernels/linear.py): measure this model's shapes here, a few seconds.
            layers = [w for w in self.model.layers[0].values() if isinstance(w, LinearWeight)]
            found = calibrate(sorted({(w.shape[1], w.shape[0]) for w in layers}))
            log.info("bf16_crossover", below={f"{w.shape[1]}x{w.shape[0]}": below(w) for w in layers},
                     rows={f"{i}x{o}": "never" if n == NEVER else n for (i, o), n in found.items()})
        if on_cpu:
            warm_up()                # numba compiles on first call: not on a first request
        if on_cpu and isinstance(self.model.lm_head, LinearWeight) and not config.deterministic:
            # Whether oneDNN's fp32 product beats our panels on the lm_head from some row count
            # depends on the CPU (AVX-512 or not: kernels/linear.py), so it is measured here.
            # (a step samples at most max_num_seqs rows: larger counts are not tried)
            rows = tuple(n for n in (1, 2, 8, 32) if n <= config.max_num_seqs) or (1,)
            found = calibrate_panels(self.model.lm_head, rows)
            log.info("head_fp32_crossover", onednn_from_rows="never" if found == NEVER else found)
        self.weights_version = 0
        self.vocab_size = self.model.lm_head.shape[0]
        self.block_size = config.block_size
        cfg = self.hf_config
        bytes_per_block = (2 * cfg.num_hidden_layers * config.block_size * cfg.num_key_value_heads
                           * self.model.head_dim * self.dtype.itemsize)
        self.num_blocks = config.num_kv_blocks or max(
            1, config.kv_cache_memory_mb * (1 << 20) // bytes_per_block)
        shape = (self.num_blocks, config.block_size, cfg.num_key_value_heads, self.model.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(cfg.num_hidden_layers)]
        self._seed_rng = random.Random(config.seed)
        # One grammar bitmask for the whole engine, sliced per step: int32 [max_num_seqs, words],
        # filled on the host (pinned on cuda) and copied once per step to its device twin (on
        # the CPU the same tensor).
        self.bitmask = torch.full((config.max_num_seqs, (self.vocab_size + 31) // 32), -1,
                                  dtype=torch.int32, pin_memory=not on_cpu)
        self.device_bitmask = self.bitmask.to(self.device)
        # Fast-forward and budget-aware closing (grammars/steering.py); the engine core sets the
        # one that knows the tokenizer.
        self.steering = Steering(self.vocab_size, fast_forward=config.grammar_fast_forward,
                                 close_reserve=config.grammar_close_reserve)
        # Masks are filled while the forward runs: off the team's cores when it is pinned (a
        # thread the compute thread creates would otherwise inherit its one core).
        # The initializer must not hold `self`: a live worker thread keeps its arguments, and
        # through them every runner ever built (a GB-sized leak per engine in one process).
        self._mask_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="plumbline-mask", initializer=_run_on,
            initargs=(self.cpu_binding.loop_cpus,))
        # The sampler's reductions over the vocabulary: batch-invariant ones in deterministic mode.
        self.reductions = INVARIANT if config.deterministic else TORCH
        # Decode steps replayed from CUDA graphs (engine/cuda_graphs.py); None: every step eager.
        self.graphs: CudaGraphs | None = None
        if self.device.type == "cuda" and config.enable_cuda_graphs:
            self.graphs = CudaGraphs.capture(self)

    @property
    def max_position_embeddings(self) -> int:
        return self.hf_config.max_position_embeddings

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Python lists for the step, each turned into a tensor once.

        Attention gets block tables: a sequence's cost here is its new tokens and its table (one
        entry per block), not its whole context."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        sample_rows: list[int] = []       # row of each sampling sequence's last token
        tables: list[list[int]] = []      # per attention row (decode rows, then prefills)
        lens: list[int] = []              # keys each of those sees
        query_lens: list[int] = []
        for i, seq in enumerate(batch.seqs):
            start, n = seq.num_computed_tokens, seq.num_scheduled_tokens
            end = start + n
            table = seq.block_table
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slot_mapping += slots_for(table, end, bs, start)
            if seq.samples_this_step:
                sample_rows.append(len(input_ids) - 1)
            if i < batch.num_decodes:
                # One query row per token, each seeing the keys up to its own position: the
                # layer stores this step's keys before attending, so later rows see earlier ones.
                for p in range(start, end):
                    tables.append(table)
                    lens.append(p + 1)
                    query_lens.append(1)
            else:
                tables.append(table)
                lens.append(end)
                query_lens.append(n)
        width = max((len(t) for t in tables), default=0)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        num_prefills = len(batch.seqs) - batch.num_decodes
        up = self.transfer.up                   # on cuda: pinned, copied without blocking
        meta = AttentionMetadata(
            slot_mapping=up(slot_mapping, torch.long),
            num_decodes=len(tables) - num_prefills,
            block_tables=up([t + [0] * (width - len(t)) for t in tables],
                            torch.int32).view(len(tables), width),
            seq_lens=up(lens, torch.int32),
            query_start_loc=up(starts, torch.int32),
            max_query_len=max(query_lens, default=0),
        )
        return up(input_ids, torch.long), up(positions, torch.long), meta, sample_rows

    @torch.inference_mode()
    def run(self, batch: Batch) -> StepResult:
        """One model step over the batch; runs in a worker thread."""
        input_ids, positions, meta, sample_rows = self.prepare(batch)
        seqs = batch.sampling_seqs
        masked_rows = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
        if masked_rows and self.steering.tokenizer is not None:
            # Built here, not in the mask thread: its vocabulary-wide torch ops would start a
            # second OpenMP team there, which slows every later step (AsyncEngine's compute thread).
            self.steering.closing_vocab()
        # The masks depend only on tokens already chosen: fill them while the forward runs (the
        # grammar libraries release the GIL), and wait for them just before sampling.
        masks = self._mask_pool.submit(self._fill_masks, seqs, masked_rows) if masked_rows else None
        try:
            replayed = (self.graphs.run(input_ids, positions, meta, len(sample_rows))
                        if self.graphs is not None else None)
            if replayed is not None:                    # a decode step: every row samples
                hidden, logits = replayed
            else:
                hidden = self.model.forward(input_ids, positions, self.kv_caches, meta)  # [T, hidden]
                logits = (self.model.compute_logits(
                    hidden[self.transfer.up(sample_rows, torch.long)]) if sample_rows else None)
            prompt_logprobs = self.prompt_logprobs(batch, hidden)
        finally:
            if masks is not None:
                masks.result()          # never leave a fill running into the next step
        if logits is None:
            return EMPTY_RESULT._replace(prompt_logprobs=prompt_logprobs,
                                         weights_version=self.weights_version)
        if masked_rows and self.device_bitmask is not self.bitmask:
            # once per step, after the fill and before the mask kernel (stream order)
            self.device_bitmask[:len(seqs)].copy_(self.bitmask[:len(seqs)], non_blocking=True)
        for seq in seqs:
            if seq.rng is None and not seq.sampling.is_greedy:
                seq.rng = torch.Generator(self.device).manual_seed(seq.seed)
        sampling = SamplingBatch.from_seqs(seqs, self.steering.eos_token_ids)
        sampling.temperatures = self.transfer.put(sampling.temperatures)          # [S]
        result = sample(logits, sampling, self.device_bitmask, masked_rows, self.reductions,
                        self.transfer.read_back)
        return result._replace(prompt_logprobs=prompt_logprobs, weights_version=self.weights_version)

    def _fill_masks(self, seqs: list[Sequence], rows: list[int]) -> None:
        """Grammar rows of this step's bitmask, then budget-aware closing where it is due."""
        fill_bitmasks(self.bitmask, [(seqs[r].grammar, r) for r in rows])   # llguidance: one call
        for row in rows:
            seq = seqs[row]
            seq.json_scan = self.steering.close_if_due(
                seq.json_scan, self.bitmask, row, seq.completion_token_ids,
                seq.sampling.max_tokens, seq.sampling.close_reserve, seq.sampling.grammar)

    def build_model(self, state: dict[str, torch.Tensor]) -> LlamaModel:
        """A model of the same architecture from new weights; refuses mismatched shapes."""
        model = LlamaModel(self.hf_config, state, self.dtype, self.config.deterministic,
                           self.device, self.head_precision)
        head = self.model.lm_head                 # its crossover was measured at load
        if isinstance(head, LinearWeight) and head.onednn_rows != NEVER:
            keep_onednn_copy(model.lm_head, head.onednn_rows)
        old, new = self.model, model
        pairs = [(old.embed, new.embed, "embed_tokens"), (old.lm_head, new.lm_head, "lm_head")]
        pairs += [(a[k], b[k], f"layers.{i}.{k}") for i, (a, b) in enumerate(zip(old.layers, new.layers))
                  for k in ("qkv", "o", "gate_up", "down")]
        for a, b, name in pairs:
            if a.shape != b.shape:
                raise ValueError(f"weight {name} has shape {tuple(b.shape)}, expected {tuple(a.shape)}")
        return model

    def swap_model(self, model: LlamaModel) -> int:
        """Install a model built by build_model (between steps only); returns the new version."""
        self.model = model
        self.weights_version += 1
        if self.graphs is not None:             # the graphs read the old weights' memory
            self.graphs = CudaGraphs.capture(self)
        return self.weights_version

    def load_weights(self, state: dict[str, torch.Tensor]) -> int:
        return self.swap_model(self.build_model(state))

    def prompt_logprobs(self, batch: Batch, hidden: torch.Tensor) -> dict[int, list[PromptLogprob]] | None:
        """Raw logprobs of the prompt tokens this step's chunks predict, for sequences that ask.

        Row t of a chunk predicts token t+1; positions collected before a preemption are skipped."""
        rows: list[int] = []
        targets: list[int] = []
        owners: list[tuple[int, int, int]] = []          # (seq_id, first row, num rows)
        offset = 0
        for seq in batch.seqs:
            start, n = seq.num_computed_tokens, seq.num_scheduled_tokens
            if seq.sampling.prompt_logprobs is not None:
                have = len(seq.prompt_logprobs or [None])   # entries for tokens 0 .. have-1
                positions = [p for p in range(start, start + n)
                             if have <= p + 1 < seq.num_prompt_tokens]
                if positions:
                    owners.append((seq.seq_id, len(rows), len(positions)))
                    rows += [offset + p - start for p in positions]
                    targets += [seq.token_ids[p + 1] for p in positions]
            offset += n
        if not rows:
            return None
        up = self.transfer.up
        logprobs = self.reductions.log_softmax(
            self.model.compute_logits(hidden[up(rows, torch.long)]))                  # [R, vocab]
        chosen_t = logprobs.gather(1, up(targets, torch.long).unsqueeze(1)).squeeze(1)  # [R]
        # vLLM's rank: 1 + how many tokens are more likely than the prompt's own
        rank_t = (logprobs > chosen_t.unsqueeze(1)).sum(-1) + 1                       # [R]
        max_top = max(s.sampling.prompt_logprobs or 0 for s in batch.seqs)
        top_vals, top_ids = (torch.topk(logprobs, max_top, -1) if max_top else (None, None))
        # A second synchronisation, in steps that compute prompt logprobs only.
        chosen_t, rank_t, top_vals, top_ids = self.transfer.read_back(chosen_t, rank_t, top_vals,
                                                                      top_ids)
        chosen, ranks = chosen_t.tolist(), rank_t.tolist()
        out: dict[int, list[PromptLogprob]] = {}
        by_id = {s.seq_id: s for s in batch.seqs}
        for seq_id, first, count in owners:
            k = by_id[seq_id].sampling.prompt_logprobs or 0
            entries = []
            for r in range(first, first + count):
                top = () if not k else tuple(TopLogprob(i, v) for i, v in zip(
                    top_ids[r, :k].tolist(), top_vals[r, :k].tolist()))
                entries.append(PromptLogprob(chosen[r], top, ranks[r]))
            out[seq_id] = entries
        return out

    def next_seed(self) -> int:
        """A seed for a request that brought none (reproducible from the engine's seed)."""
        return self._seed_rng.getrandbits(63)


def _run_on(cpus: tuple[int, ...]) -> None:
    """Pool initializer: move the calling thread to `cpus` (empty: leave it where it is)."""
    if cpus:
        os.sched_setaffinity(0, cpus)
