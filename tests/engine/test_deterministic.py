"""Deterministic mode: tokens and logprobs bit-identical for a request alone, among many others,
and under forced preemption; a position's logits the same bits in any step shape."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from engine import LLM, SamplingParams
from grammars.spec import GrammarSpec

BASE = ("In the beginning the universe was created. This has made a lot of people very angry "
        "and been widely regarded as a bad move. ")
STARTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "Dear diary,"]
SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                      "age": {"type": "integer"}},
                     "required": ["name", "age"], "additionalProperties": False})


def requests(count: int, max_tokens: int):
    """Greedy and seeded requests of four prompt lengths; one asks for n = 2, one is
    constrained by a JSON schema (grammar-forced tokens computed with the next step's rows)."""
    prompts, params = [], []
    for i in range(count):
        prompts.append(STARTS[i % 4] + " " + BASE * (i % 4))
        kw = dict(max_tokens=max_tokens + i % 7, logprobs=2)
        if i == 3:
            kw["grammar"] = GrammarSpec("json_schema", SCHEMA)
        if i == 5:
            kw["n"] = 2
        params.append(SamplingParams(temperature=0.0, **kw) if i % 2 == 0 else
                      SamplingParams(temperature=0.9, top_p=0.95, seed=i, **kw))
    return prompts, params


def signature(out):
    return [(o.token_ids, o.logprobs, [[(t.token_id, t.logprob) for t in row] for row in o.top_logprobs])
            for o in out.outputs]


def record(llm: LLM) -> tuple[list[int], list[int]]:
    """Record the number of token rows of every step the engine runs, and the prompt tokens
    each delta says came from the prefix cache."""
    counts: list[int] = []
    cached: list[int] = []
    run, step = llm.core.runner.run, llm.core.step

    def counting_run(batch):  # type: ignore[no-untyped-def]
        counts.append(batch.num_tokens)
        return run(batch)

    def counting_step():  # type: ignore[no-untyped-def]
        deltas = step()
        cached.extend(d.num_cached_tokens for d in deltas)
        return deltas
    llm.core.runner.run, llm.core.step = counting_run, counting_step
    return counts, cached


def check_invariance(model_dir, count, max_tokens, small_blocks):
    prompts, params = requests(count, max_tokens)
    llm = LLM(str(model_dir), deterministic=True, max_num_batched_tokens=96)
    alone = [signature(llm.generate([p], [sp])[0]) for p, sp in zip(prompts, params)]
    counts, cached = record(llm)
    together = [signature(o) for o in llm.generate(prompts, params)]
    assert together == alone
    # steps of many sizes, not only multiples of 4 (the old trick's assumption), prompts
    # chunked wherever the budget fell, and prompts that reused the KV the alone runs left
    assert len({n for n in counts if n % 4}) >= 3, counts
    assert max(cached) > 0
    squeezed_llm = LLM(str(model_dir), deterministic=True, max_num_batched_tokens=96,
                       num_kv_blocks=small_blocks, block_size=16)
    squeezed = [signature(o) for o in squeezed_llm.generate(prompts, params)]
    assert squeezed_llm.core.scheduler.num_preemptions > 0
    assert squeezed == alone
    document = llm.generate([prompts[3]], [params[3]])[0].outputs[0].text
    assert document.startswith("{")          # the constrained request was constrained
    assert len(alone[5]) == 2 and alone[5][0] != alone[5][1]     # n = 2: two samples


def test_tiny_model_bit_identical_alone_batched_preempted(tiny_model_dir):
    check_invariance(tiny_model_dir, count=16, max_tokens=12, small_blocks=14)


@pytest.mark.slow
def test_default_model_bit_identical_alone_batched_preempted(default_model_dir):
    check_invariance(default_model_dir, count=6, max_tokens=6, small_blocks=8)


class Steps:
    """Drive the deterministic model directly: sequences own disjoint blocks, each step says
    how many tokens of which sequence it computes (decodes first, as the scheduler orders).
    Targets take blocks from the bottom of the cache; fillers reuse blocks from FILLER_BLOCKS on."""

    FILLER_BLOCKS = 128

    def __init__(self, model_dir) -> None:
        llm = LLM(str(model_dir), deterministic=True, num_kv_blocks=256, block_size=16)
        self.runner = llm.core.runner
        self.next_block = 0

    def sequence(self, token_ids: list[int], computed: int = 0,
                 filler: bool = False) -> SimpleNamespace:
        blocks = (len(token_ids) + 15) // 16
        if filler:          # a decode filler's blocks past a prefill filler's
            first = self.FILLER_BLOCKS + (64 if computed else 0)
        else:
            first = self.next_block
            self.next_block += blocks
            assert self.next_block <= self.FILLER_BLOCKS
        return SimpleNamespace(token_ids=token_ids, block_table=list(range(first, first + blocks)),
                               num_computed_tokens=computed, num_scheduled_tokens=0,
                               samples_this_step=False)

    def run(self, decodes: list[tuple[SimpleNamespace, int]],
            prefills: list[tuple[SimpleNamespace, int]]) -> list[torch.Tensor]:
        """One step; returns each listed sequence's logits rows [n, vocab]."""
        seqs = []
        for seq, n in decodes + prefills:
            seq.num_scheduled_tokens = n
            seqs.append(seq)
        batch = SimpleNamespace(seqs=seqs, num_decodes=len(decodes))
        input_ids, positions, meta, _ = self.runner.prepare(batch)
        model = self.runner.model
        logits = model.compute_logits(model.forward(input_ids, positions, self.runner.kv_caches, meta))
        out, start = [], 0
        for seq in seqs:
            n = seq.num_scheduled_tokens
            out.append(logits[start:start + n])
            start += n
            seq.num_computed_tokens += n
        return out


def test_a_position_has_the_same_bits_in_every_step_shape(tiny_model_dir):
    """The same 40 tokens computed one per step alone (the reference), as one prefill, in
    ragged prefill chunks and as multi-token decode rows (grammar-forced tokens) inside steps of
    every row count from 1 to 40, among other sequences' decodes and prefills."""
    steps = Steps(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 1000, (40,), generator=g).tolist()
    filler = torch.randint(3, 1000, (80,), generator=g).tolist()

    target = steps.sequence(tokens)
    reference = torch.cat([steps.run([], [(target, 1)])[0] for _ in range(40)])

    target = steps.sequence(tokens)
    assert torch.equal(steps.run([], [(target, 40)])[0], reference)

    chunks = [1, 3, 2, 7, 5, 1, 4, 6, 11]
    seen_totals = set()
    for as_decode in (False, True):
        for offset in range(0, 40, 8):              # step totals offset, offset + 1, ... (mod 40)
            target = steps.sequence(tokens)
            got = []
            while target.num_computed_tokens < 40:
                total = (offset + len(got)) % 40 + 1
                n = min(chunks[len(got) % len(chunks)], 40 - target.num_computed_tokens, total)
                others = total - n
                # an older sequence's decode row, and a fresh prefill for the rest
                decodes = [(steps.sequence(filler[:60], computed=59, filler=True), 1)] if others else []
                prefills = ([(steps.sequence(filler[:others - 1], filler=True), others - 1)]
                            if others > 1 else [])
                if as_decode:
                    rows = steps.run([(target, n)] + decodes, prefills)[0]
                else:
                    rows = steps.run(decodes, prefills + [(target, n)])[-1]
                got.append(rows)
                seen_totals.add(total)
            assert torch.equal(torch.cat(got), reference), (as_decode, offset)
    assert seen_totals == set(range(1, 41))
