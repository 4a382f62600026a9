"""The scheduler alone: fake step results stand in for the model."""
from engine.block_manager import BlockManager
from engine.scheduler import Scheduler
from engine.types import StepResult
from engine.sequence import Sequence, SequenceStatus
from engine.types import FinishReason, SamplingParams

EOS = 2


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=16, max_model_len=256):
    bm = BlockManager(num_blocks, block_size)
    return bm, Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                         max_model_len=max_model_len, eos_token_ids={EOS})


def add(sched, rid, prompt_len, max_tokens=4, **kw):
    s = Sequence(rid, 0, [5] * prompt_len, prompt_len, SamplingParams(max_tokens=max_tokens, **kw), 0)
    sched.add(s)
    return s


def step(sched, token=7):
    """One step; returns the batch and the number of tokens it scheduled."""
    batch = sched.schedule()
    n = len(batch.sampling_seqs)
    num_tokens = batch.num_tokens
    sched.postprocess(batch, StepResult([token] * n, [0.0] * n, [()] * n))
    return batch, num_tokens


def test_chunked_prefill_mixes_with_decodes_within_budget():
    bm, sched = make(budget=16)
    a = add(sched, "a", 10)
    batch, num_tokens = step(sched)
    assert num_tokens == 10 and a.num_completion_tokens == 1
    b = add(sched, "b", 30)
    batch, _ = step(sched)
    # a decodes (1 token), b's prefill takes the remaining 15 of the budget
    assert [s.request_id for s in batch.seqs] == ["a", "b"] and batch.num_decodes == 1
    assert b.num_computed_tokens == 15 and b.num_completion_tokens == 0
    batch, num_tokens = step(sched)
    assert b.num_computed_tokens == 30 and b.num_completion_tokens == 1   # chunk reached the end
    assert num_tokens == 16


def test_finish_on_length_eos_and_stop_token_frees_blocks():
    bm, sched = make()
    a = add(sched, "a", 3, max_tokens=2)
    b = add(sched, "b", 3, max_tokens=5)
    c = add(sched, "c", 3, max_tokens=5, stop_token_ids=(9,))
    step(sched)                                   # all prefill, token 7
    batch = sched.schedule()
    sched.postprocess(batch, StepResult([7, EOS, 9], [0.0] * 3, [()] * 3))
    assert a.finish_reason is FinishReason.LENGTH
    assert b.finish_reason is FinishReason.STOP and c.finish_reason is FinishReason.STOP
    assert bm.num_free_blocks == bm.num_blocks and not sched.has_work()


def test_ignore_eos_keeps_going():
    bm, sched = make()
    a = add(sched, "a", 3, max_tokens=3, ignore_eos=True)
    for _ in range(3):
        step(sched, token=EOS)
    assert a.num_completion_tokens == 3 and a.finish_reason is FinishReason.LENGTH


def test_preemption_by_recompute_when_blocks_run_out():
    # Each sequence alone fits (8 + 20 tokens = 7 blocks) but both together do not.
    bm, sched = make(num_blocks=8, block_size=4, budget=64)
    a = add(sched, "a", 8, max_tokens=20)
    b = add(sched, "b", 8, max_tokens=20)
    step(sched)                                   # 2 blocks each + growth
    preempted = 0
    for _ in range(100):
        if not sched.has_work():
            break
        before = sched.num_preemptions
        step(sched)
        preempted += sched.num_preemptions - before
        used = sum(len(s.block_table) for s in sched.running)
        assert used + bm.num_free_blocks == bm.num_blocks
    assert preempted >= 1
    assert a.num_completion_tokens == 20 and b.num_completion_tokens == 20
    assert bm.num_free_blocks == bm.num_blocks


def test_abort_mid_step_applies_in_postprocess():
    bm, sched = make()
    a = add(sched, "a", 5, max_tokens=10)
    b = add(sched, "b", 5, max_tokens=10)
    batch = sched.schedule()
    sched.abort("a")                              # lands while the step "runs"
    assert a.block_table, "blocks must stay while the step reads them"
    changed = sched.postprocess(batch, StepResult([7, 7], [0.0, 0.0], [(), ()]))
    assert a.finish_reason is FinishReason.ABORT and a in changed
    assert b.status is SequenceStatus.RUNNING
    sched.abort("b")
    sched.postprocess(sched.schedule(), StepResult([7], [0.0], [()]))
    assert bm.num_free_blocks == bm.num_blocks and not sched.has_work()


def test_max_num_seqs_bounds_running():
    bm, sched = make(max_num_seqs=2, budget=100)
    for i in range(5):
        add(sched, str(i), 3)
    batch, _ = step(sched)
    assert len(batch.seqs) == 2 and len(sched.waiting) == 3


class _DeadAfter:
    """A relaxed grammar stand-in: takes every token; after `n` tokens its document is complete
    and fails its schema, so no token may follow (is_dead)."""

    def __init__(self, n: int) -> None:
        self.n, self.taken = n, 0

    def accept_token(self, token_id: int) -> bool:
        self.taken += 1
        return True

    def is_terminated(self) -> bool:
        return False

    def is_dead(self) -> bool:
        return self.taken >= self.n

    def forced_tokens(self) -> list[int]:
        return []


def test_a_dead_grammar_ends_length_not_error_and_frees_its_blocks():
    """A fallback schema that cannot be completed validly ends like a budget that ran out
    ("length", which the gateway marks incomplete), never as an error mid-stream."""
    bm, sched = make()
    free = bm.num_free_blocks
    s = add(sched, "a", 6, max_tokens=50)
    s.grammar = _DeadAfter(3)
    for _ in range(3):
        step(sched)
    assert s.finish_reason is FinishReason.LENGTH and s.error is None
    assert s.num_completion_tokens == 3 and bm.num_free_blocks == free


def test_aborting_one_sequence_frees_its_blocks_while_its_sibling_goes_on():
    # n = 2: a choice that hit a stop string is aborted alone (the gateway matches the text)
    bm, sched = make()
    params = SamplingParams(max_tokens=10, n=2)
    a0, a1 = (Sequence("a", i, [5] * 6, 6, params, i) for i in range(2))
    sched.add(a0)
    sched.add(a1)
    step(sched)
    step(sched)
    assert len(a0.block_table) == len(a1.block_table) == 2
    assert bm.num_free_blocks == bm.num_blocks - 4
    sched.abort("a", 0)
    step(sched)
    assert a0.finish_reason is FinishReason.ABORT and a1.status is SequenceStatus.RUNNING
    assert bm.num_free_blocks == bm.num_blocks - len(a1.block_table)
    while sched.has_work():
        step(sched)
    assert a1.finish_reason is FinishReason.LENGTH and a1.num_completion_tokens == 10
    assert bm.num_free_blocks == bm.num_blocks


def test_waiting_order_is_priority_then_arrival():
    bm, sched = make(max_num_seqs=1, budget=100)
    first = add(sched, "first", 3)
    late = add(sched, "late", 3, priority=5)
    urgent = add(sched, "urgent", 3, priority=-1)
    tie = add(sched, "tie", 3, priority=5)
    normal = add(sched, "normal", 3)
    admitted = []
    while sched.has_work():
        batch, _ = step(sched)
        admitted += [s.request_id for s in batch.seqs if s.request_id not in admitted]
    assert admitted == ["urgent", "first", "normal", "late", "tie"]
    assert all(s.finish_reason is FinishReason.LENGTH for s in (first, late, urgent, tie, normal))


def test_a_preempted_sequence_goes_back_by_its_priority():
    bm, sched = make(num_blocks=8, block_size=4, budget=64, max_num_seqs=2)
    a = add(sched, "a", 8, max_tokens=20, priority=3)
    b = add(sched, "b", 8, max_tokens=20, priority=3)
    step(sched)
    urgent = add(sched, "urgent", 4, max_tokens=2, priority=0)
    sched.preempt(b)
    assert [s.request_id for s in sched.waiting] == ["urgent", "b"]
    while sched.has_work():
        step(sched)
    assert [s.num_completion_tokens for s in (a, b, urgent)] == [20, 20, 2]
