"""A sequence: one stream of tokens being generated (a request with n > 1 has n of them)."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from engine.types import FinishReason, SamplingParams, TopLogprob


class SequenceStatus(enum.IntEnum):
    # Ordered so that "finished" is one comparison: status >= FINISHED.
    WAITING_FOR_GRAMMAR = 0
    WAITING = 1
    RUNNING = 2
    FINISHED = 3


_ids = itertools.count()
# Beyond this many uncomputed tokens a running sequence goes through the prefill path instead.
MAX_DECODE_ROWS = 16


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    index: int                               # position within its request (n > 1)
    token_ids: list[int]                     # prompt + completion
    num_prompt_tokens: int
    sampling: SamplingParams
    seed: int                                # of this sequence's own random stream
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0             # tokens whose KV is in the cache
    num_scheduled_tokens: int = 0            # tokens this step computes
    block_table: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    weights_versions: list[int] = field(default_factory=list)   # of each completion token
    top_logprobs: list[tuple[TopLogprob, ...]] = field(default_factory=list)
    num_sent_tokens: int = 0                 # completion tokens already handed out as deltas
    prompt_logprobs: list[Any] | None = None  # PromptLogprob per prompt token, when asked
    num_preemptions: int = 0
    error: str | None = None
    rng: Any = None                          # torch.Generator, owned by the sampler
    # Uniforms the sampler discards before its next draw: one per fast-forwarded token, so a
    # seeded stream is the same with and without fast-forward.
    num_skipped_draws: int = 0
    grammar: Any = None                      # grammars.Grammar cursor, or None (unconstrained)
    json_scan: Any = None                    # grammars.closing.JsonScan, for budget-aware closing
    # Prefix cache (engine/block_manager.py): the weights version this sequence's KV was
    # computed with (None: it changed mid-way, no more blocks are cached), the chained digests
    # of its whole blocks so far, how many of its leading blocks were found in or offered to the
    # cache, and how many prompt tokens its first admission found there (usage's cached_tokens).
    kv_version: int | None = None
    block_digests: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status >= SequenceStatus.FINISHED

    @property
    def is_decode(self) -> bool:
        """Past its prompt with at most MAX_DECODE_ROWS tokens to compute (the sampled one and
        any that grammar fast-forward appended): each goes through decode attention as a query
        row of its own. The prefill path would cost a call per sequence and layer."""
        return (self.num_computed_tokens >= self.num_prompt_tokens
                and self.num_tokens - self.num_computed_tokens <= MAX_DECODE_ROWS)

    @property
    def samples_this_step(self) -> bool:
        """Whether the scheduled chunk reaches the end of the sequence (so a token is sampled)."""
        return self.num_computed_tokens + self.num_scheduled_tokens == self.num_tokens
