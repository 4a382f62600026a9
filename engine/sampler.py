"""penalties -> logit rules -> (grammar mask) -> temperature -> top-k / top-p / min-p ->
log_softmax -> sample. Logit rules: logit_bias, allowed_token_ids, bad_words, min_tokens.

The processed distribution is computed once; the token is drawn from it and its logprob read from
the same tensor, so a reported logprob is by construction that of the distribution sampled from.

- processed (default): log-softmax after penalties, temperature and truncation. For greedy rows
  (temperature 0) it is the log-softmax after penalties at temperature 1, untruncated.
- raw: log-softmax of the unmodified model logits.

Each sequence draws one uniform number per sampled token from its own generator and inverts the
CDF of its row, so its random stream never depends on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable
from typing import Callable, NamedTuple

import torch

from engine.sequence import Sequence
from engine.types import StepResult, TopLogprob
from kernels import apply_token_bitmask, invariant

Op = Callable[[torch.Tensor], torch.Tensor]


class Reductions(NamedTuple):
    """The sampler's reductions over the vocabulary (each over the last dimension)."""

    log_softmax: Op
    softmax: Op
    exp: Op
    cumsum: Op


TORCH = Reductions(lambda x: torch.log_softmax(x, -1), lambda x: torch.softmax(x, -1), torch.exp,
                   lambda x: torch.cumsum(x, -1))
# Deterministic mode: fixed-order kernels of ours, the same bits whatever the batch or the CPU
# (torch's loops round a tensor's last elements through scalar libm calls, kernels/invariant.py).
INVARIANT = Reductions(invariant.log_softmax, invariant.softmax, invariant.exp, invariant.cumsum)


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling inputs, built from the sequences that sample this step."""

    temperatures: torch.Tensor    # [S] fp32; 1.0 for greedy rows
    is_greedy: list[bool]
    top_k: list[int]
    top_p: list[float]
    min_p: list[float]
    penalized_rows: list[int]
    ruled_rows: list[int]         # rows with logit_bias, min_tokens, allowed_token_ids, bad_words
    stop_ids: list[int]           # EOS ids, which min_tokens holds off (with the stop_token_ids)
    num_top: list[int]            # top-N alternatives wanted per row (0 = none)
    raw_rows: list[int]           # rows reporting raw logprobs
    seqs: list[Sequence]

    @classmethod
    def from_seqs(cls, seqs: list[Sequence], eos_token_ids: Iterable[int] = ()) -> SamplingBatch:
        ps = [s.sampling for s in seqs]
        return cls(
            temperatures=torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in ps],
                                      dtype=torch.float32),
            is_greedy=[p.is_greedy for p in ps],
            top_k=[p.top_k for p in ps], top_p=[p.top_p for p in ps], min_p=[p.min_p for p in ps],
            penalized_rows=[i for i, p in enumerate(ps) if p.has_penalties],
            ruled_rows=[i for i, p in enumerate(ps) if p.has_logit_rules],
            stop_ids=sorted(eos_token_ids),
            num_top=[p.logprobs or 0 for p in ps],
            raw_rows=[i for i, p in enumerate(ps) if p.logprobs_mode == "raw"],
            seqs=seqs,
        )


def apply_penalties(logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
    """In place on logits [S, vocab]. Presence/frequency count completion tokens (OpenAI);
    repetition divides positive / multiplies negative logits of prompt+completion tokens (HF)."""
    vocab = logits.shape[1]
    for r in rows:
        seq, p = seqs[r], seqs[r].sampling
        row = logits[r]                                                     # [vocab]
        if p.repetition_penalty != 1.0 and seq.token_ids:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                    vals * p.repetition_penalty)
        out = seq.completion_token_ids
        if out and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(torch.tensor(out, dtype=torch.long, device=row.device),
                                    minlength=vocab)
            counts = counts[:vocab].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def apply_logit_rules(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place on logits [S, vocab], before the grammar mask: logit_bias added, tokens outside
    allowed_token_ids and banned bad words masked."""
    for r in batch.ruled_rows:
        p = batch.seqs[r].sampling
        row = logits[r]                                                     # [vocab]
        if p.bad_words_token_ids:
            banned = banned_tokens(p.bad_words_token_ids, batch.seqs[r].completion_token_ids)
            if banned:
                row[banned] = float("-inf")
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias)
            row[list(ids)] += torch.tensor(bias, dtype=row.dtype, device=row.device)
        if p.allowed_token_ids is not None:
            keep = torch.full_like(row, float("-inf"))
            keep[list(p.allowed_token_ids)] = 0.0
            row += keep


def banned_tokens(words: tuple[tuple[int, ...], ...], output: list[int]) -> list[int]:
    """The tokens bad_words bans next: each word's last token where the output (the completion
    only, as vLLM) ends with the word's other tokens; a one-token word always."""
    out = []
    for word in words:
        *head, last = word
        if not head or (len(head) <= len(output) and output[len(output) - len(head):] == head):
            out.append(last)
    return out


def hold_stops(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place, after every mask: EOS and stop_token_ids masked while a row is short of
    min_tokens, unless nothing else is left (a grammar that allows only EOS still ends)."""
    for r in batch.ruled_rows:
        seq, p = batch.seqs[r], batch.seqs[r].sampling
        if seq.num_completion_tokens >= p.min_tokens:
            continue
        row, stops = logits[r], batch.stop_ids + list(p.stop_token_ids)   # [vocab]
        kept = row[stops].clone()
        row[stops] = float("-inf")
        # no bool(): reading a device tensor on the host would synchronise the step
        row[stops] = torch.where(torch.isneginf(row).all(), kept, row[stops])


def truncate(logits: torch.Tensor, top_k: int, top_p: float, min_p: float,
             ops: Reductions = TORCH) -> torch.Tensor:
    """One row [vocab] of temperature-scaled logits with dropped tokens set to -inf.

    Order: top-k, then top-p on what is left, then min-p on what is left; at least the most
    likely token always survives."""
    if top_k > 0 and top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = ops.softmax(sorted_logits)
        drop = (ops.cumsum(probs) - probs) > top_p   # mass before this token exceeds p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = ops.softmax(logits)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def _draw(seq: Sequence) -> torch.Tensor:
    """seq's next uniform, after the ones it owes for fast-forwarded tokens."""
    for _ in range(seq.num_skipped_draws):
        torch.rand((), generator=seq.rng, device=seq.rng.device)
    seq.num_skipped_draws = 0
    return torch.rand((), generator=seq.rng, device=seq.rng.device)


def _as_is(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return list(tensors)


def sample(logits: torch.Tensor, batch: SamplingBatch, bitmask: torch.Tensor | None = None,
           masked_rows: list[int] | None = None, ops: Reductions = TORCH,
           read_back: Callable[..., list[torch.Tensor | None]] = _as_is) -> StepResult:
    """logits [S, vocab] fp32 (modified in place) -> one token, logprob and top-N per row.

    bitmask [>= S, ceil(vocab/32)] int32 on logits' device: grammar masks for masked_rows
    (others untouched). read_back brings the results to the host with one synchronisation
    (engine/device.py: Transfer.read_back)."""
    raw_logprobs = ops.log_softmax(logits[batch.raw_rows]) if batch.raw_rows else None
    if batch.penalized_rows:
        apply_penalties(logits, batch.penalized_rows, batch.seqs)
    if batch.ruled_rows:
        apply_logit_rules(logits, batch)
    if masked_rows:
        apply_token_bitmask(logits, bitmask, masked_rows)                 # one batched apply
    if batch.ruled_rows:
        hold_stops(logits, batch)
    logits.div_(batch.temperatures.to(logits.device).unsqueeze(1))          # [S, vocab]
    for r, seq in enumerate(batch.seqs):
        if not batch.is_greedy[r] and (batch.top_k[r] or batch.top_p[r] < 1.0 or batch.min_p[r]):
            logits[r] = truncate(logits[r], batch.top_k[r], batch.top_p[r], batch.min_p[r], ops)
    logprobs = ops.log_softmax(logits)                                      # [S, vocab] processed
    # Greedy picks from the logits, not the log-softmax: subtracting logsumexp can round two
    # close logits into a tie that transformers' argmax would not see.
    token_ids = torch.argmax(logits, dim=-1)                                # [S] greedy choice
    sampled_rows = [r for r, g in enumerate(batch.is_greedy) if not g]
    if sampled_rows:
        # A device index from pinned memory: indexing with a list would copy it up blocking,
        # which synchronises a CUDA stream.
        rows = torch.tensor(sampled_rows, pin_memory=logits.is_cuda).to(logits.device,
                                                                          non_blocking=True)
        # Inverse CDF with one uniform in (0, 1] per row: a zero-probability token is never hit.
        u = torch.stack([1.0 - _draw(batch.seqs[r]) for r in sampled_rows])
        probs = ops.exp(logprobs[rows])                                     # [R, vocab]
        cdf = ops.cumsum(probs)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
        token_ids[rows] = picks.clamp_(max=logits.shape[1] - 1)
    report = logprobs
    if raw_logprobs is not None:
        report = logprobs.clone()
        report[batch.raw_rows] = raw_logprobs
    chosen = report.gather(1, token_ids.unsqueeze(1)).squeeze(1)            # [S]
    max_top = max(batch.num_top)
    top_vals, top_ids = torch.topk(report, max_top, dim=-1) if max_top else (None, None)
    token_ids, chosen, top_vals, top_ids = read_back(token_ids, chosen, top_vals, top_ids)
    tops: list[tuple[TopLogprob, ...]] = [()] * len(batch.seqs)
    if max_top:
        vals, ids = top_vals.tolist(), top_ids.tolist()                     # [S, max_top]
        tops = [tuple(TopLogprob(t, v) for t, v in zip(ids[r][:n], vals[r][:n]))
                for r, n in enumerate(batch.num_top)]
    return StepResult(token_ids.tolist(), chosen.tolist(), tops)
