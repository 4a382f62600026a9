"""Weights, KV cache and the step: prepare inputs -> forward -> logits (fp32) -> sample."""
from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoConfig

from engine.config import EngineConfig
from engine.loader import load_state_dict
from engine.model import LlamaModel
from engine.sampler import SamplingBatch, sample
from engine.scheduler import EMPTY_RESULT, Batch, StepResult
from kernels import AttentionMetadata, slots_for

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.hf_config = AutoConfig.from_pretrained(str(model_dir))
        if self.hf_config.model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"model type {self.hf_config.model_type!r} is not llama-family")
        self.dtype = _DTYPES[config.dtype]
        self.model = LlamaModel(self.hf_config, load_state_dict(model_dir), self.dtype)
        self.vocab_size = self.model.lm_head.shape[0]
        self.block_size = config.block_size
        cfg = self.hf_config
        bytes_per_block = (2 * cfg.num_hidden_layers * config.block_size * cfg.num_key_value_heads
                           * self.model.head_dim * self.dtype.itemsize)
        self.num_blocks = config.num_kv_blocks or max(
            1, config.kv_cache_memory_mb * (1 << 20) // bytes_per_block)
        shape = (self.num_blocks, config.block_size, cfg.num_key_value_heads, self.model.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype))
                          for _ in range(cfg.num_hidden_layers)]
        self._seed_rng = random.Random(config.seed)
        # One grammar bitmask for the whole engine, sliced per step: int32 [max_num_seqs, words].
        self.bitmask = torch.full((config.max_num_seqs, (self.vocab_size + 31) // 32), -1,
                                  dtype=torch.int32)

    @property
    def max_position_embeddings(self) -> int:
        return self.hf_config.max_position_embeddings

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Python lists for the step, each turned into a tensor once."""
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        sample_rows: list[int] = []       # row of each sampling sequence's last token
        decode_slots: list[list[int]] = []
        prefill_q, prefill_len, prefill_slots = [], [], []
        for i, seq in enumerate(batch.seqs):
            start, n = seq.num_computed_tokens, seq.num_scheduled_tokens
            end = start + n
            seq_slots = slots_for(seq.block_table, end, self.block_size)
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slot_mapping += seq_slots[start:end]
            if seq.samples_this_step:
                sample_rows.append(len(input_ids) - 1)
            if i < batch.num_decodes:
                decode_slots.append(seq_slots)
            else:
                prefill_q.append(n)
                prefill_len.append(end)
                prefill_slots.append(torch.tensor(seq_slots, dtype=torch.long))
        max_len = max((len(s) for s in decode_slots), default=0)
        decode_mask = torch.zeros(len(decode_slots), 1, 1, max_len, dtype=torch.bool)
        for b, s in enumerate(decode_slots):
            decode_mask[b, 0, 0, :len(s)] = True
        padded = [s + [0] * (max_len - len(s)) for s in decode_slots]   # 0: a harmless slot, masked
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long),
            num_decodes=batch.num_decodes,
            decode_slots=torch.tensor(padded, dtype=torch.long).view(len(padded), max_len),
            decode_mask=decode_mask,
            prefill_query_lens=prefill_q, prefill_seq_lens=prefill_len, prefill_slots=prefill_slots,
        )
        return (torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                meta, sample_rows)

    @torch.inference_mode()
    def run(self, batch: Batch) -> StepResult:
        """One model step over the batch; runs in a worker thread."""
        input_ids, positions, meta, sample_rows = self.prepare(batch)
        hidden = self.model.forward(input_ids, positions, self.kv_caches, meta)   # [T, hidden]
        if not sample_rows:
            return EMPTY_RESULT
        logits = self.model.compute_logits(hidden[sample_rows])                   # [S, vocab] fp32
        seqs = batch.sampling_seqs
        masked_rows = []
        for row, seq in enumerate(seqs):
            if seq.rng is None and not seq.sampling.is_greedy:
                seq.rng = torch.Generator().manual_seed(seq.seed)
            if seq.grammar is not None:
                seq.grammar.fill_bitmask(self.bitmask, row)
                masked_rows.append(row)
        return sample(logits, SamplingBatch.from_seqs(seqs), self.bitmask, masked_rows)

    def next_seed(self) -> int:
        """A seed for a request that brought none (reproducible from the engine's seed)."""
        return self._seed_rng.getrandbits(63)
