"""Continuous batching: waiting and running queues, chunked prefill, preemption by recompute.

No torch (grammar masks stay behind grammars/), no asyncio, no I/O. State changes only between
steps, on the event loop; an abort that lands mid-step is recorded and applied in `postprocess`,
never while the step reads the blocks.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus
from engine.types import Batch, FinishReason, StepResult, TopLogprob
from grammars.steering import Steering, TokenVerdict


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, eos_token_ids: set[int],
                 enable_chunked_prefill: bool = True, steering: Steering | None = None,
                 weights_version: Callable[[], int] = lambda: 0) -> None:
        self.blocks = block_manager
        self.weights_version = weights_version    # the runner's now: roots a prefix-cache lookup
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        # (request_id, index): one sequence of a request (a choice that hit a stop string while
        # its siblings go on); (request_id, None): all of them.
        self.aborted: set[tuple[str, int | None]] = set()
        self.num_preemptions = 0
        self.admitting = True     # False while a weight update drains: only preempted ones resume
        # What constrained decoding decides after a token (grammars/steering.py); None: the
        # grammars are only accepted and checked for completion, nothing is fast-forwarded.
        self.steering = steering or Steering(0, fast_forward=False)
        self.num_forced_tokens = 0

    def add(self, seq: Sequence) -> None:
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        """Into the waiting queue by (priority, arrival): a lower priority value goes first
        (vLLM's), ties by arrival (seq_id). Scanned from the back: first come, first served
        costs one comparison."""
        key = _order(seq)
        i = len(self.waiting)
        while i > 0 and _order(self.waiting[i - 1]) > key:
            i -= 1
        self.waiting.insert(i, seq)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Finish the request's sequences (or only the one at `index`) at the next postprocess."""
        self.aborted.add((request_id, index))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.aborted)

    def schedule(self) -> Batch:
        budget = self.max_num_batched_tokens
        decodes: list[Sequence] = []
        prefills: list[Sequence] = []
        # decode: running sequences, oldest first (a chunked prefill in progress continues here)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            if n == 0:
                i += 1
                continue
            if not self._reserve(seq, n):
                break                                   # seq itself was preempted
            seq.num_scheduled_tokens = n
            budget -= n
            (decodes if seq.is_decode else prefills).append(seq)
            i += 1
        # prefill: admit waiting sequences while budget, slots and blocks last
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting()
            if seq is None:
                break
            prefix = self.blocks.match(seq, self.weights_version())    # cached leading blocks
            done = len(prefix) * self.blocks.block_size
            n = seq.num_tokens - done
            if n > budget and not self.enable_chunked_prefill:
                break
            n = self._chunk(seq, budget, done)
            if n == 0:
                break
            if not self.blocks.can_allocate(self.blocks.blocks_needed(seq, n, prefix)):
                break
            self.blocks.allocate(seq, n, prefix)
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING
            seq.num_scheduled_tokens = n
            budget -= n
            (decodes if seq.is_decode else prefills).append(seq)
        return Batch(decodes + prefills, len(decodes))

    def _next_waiting(self) -> Sequence | None:
        """The head of the queue; while a weight update drains, the first preempted one (it
        resumes; a priority may have put newcomers ahead of it, which wait)."""
        if self.admitting:
            return self.waiting[0]
        return next((s for s in self.waiting if s.num_preemptions), None)

    def _chunk(self, seq: Sequence, budget: int, done: int | None = None) -> int:
        """Tokens to compute for seq this step, from `done` computed tokens (default: seq's own
        count; a prefix cache hit on admission). Deterministic mode needs no special shapes:
        its kernels give a position the same bits in any chunk (kernels/invariant.py)."""
        done = seq.num_computed_tokens if done is None else done
        return min(seq.num_tokens - done, budget)

    def _reserve(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Allocate blocks for seq, preempting the newest running sequences if needed."""
        while not self.blocks.can_allocate(self.blocks.blocks_needed(seq, num_new_tokens)):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.allocate(seq, num_new_tokens)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Recompute later: drop its KV, keep its tokens, queue it again in its place (ahead of
        everything of its priority that arrived after it)."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)

    def postprocess(self, batch: Batch, result: StepResult,
                    error: str | None = None) -> list[Sequence]:
        """Append sampled tokens, finish sequences, free blocks; return the sequences that changed.

        The only place a sequence finishes. `error` fails every sequence of the batch.
        """
        changed: list[Sequence] = []
        samples = iter(zip(result.token_ids, result.logprobs, result.top_logprobs))
        for seq in batch.seqs:
            sampled = seq.samples_this_step
            if result.prompt_logprobs and seq.seq_id in result.prompt_logprobs:
                seq.prompt_logprobs = (seq.prompt_logprobs or [None]) + result.prompt_logprobs[seq.seq_id]
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if error is not None:
                seq.error = error
                self._finish(seq, FinishReason.ERROR)
                changed.append(seq)
                continue
            if seq.is_finished:
                continue
            self.blocks.register(seq, result.weights_version)    # blocks this step filled
            if not sampled:
                continue
            token_id, logprob, top = next(samples)
            seq.token_ids.append(token_id)
            seq.logprobs.append(logprob)
            seq.weights_versions.append(result.weights_version)
            seq.top_logprobs.append(top)
            verdict = None if seq.grammar is None else self.steering.accept(seq.grammar, token_id)
            if verdict is TokenVerdict.REJECTED:
                # The mask allowed only what the grammar accepts: this is a bug, not bad input.
                seq.error = f"grammar rejected sampled token {token_id}"
                self._finish(seq, FinishReason.ERROR)
                changed.append(seq)
                continue
            reason = self._stop_reason(seq, token_id, verdict is TokenVerdict.COMPLETE)
            if reason is None and verdict is TokenVerdict.DEAD:
                # Only a relaxed (fallback) grammar gets here: the complete document fails its
                # schema and no token may follow. Never sample from an all-masked row. Like a
                # budget that ran out, the output could not be completed: "length", which the
                # gateway marks incomplete (and the guard's truncation check blocks in block
                # mode); not an error, which would end a stream mid-way.
                reason = FinishReason.LENGTH
            if reason is None and verdict is TokenVerdict.ACCEPTED:
                reason = self._fast_forward(seq, result.weights_version)
            if reason is not None:
                self._finish(seq, reason)
            changed.append(seq)
        if self.aborted:
            for seq in [*self.running, *self.waiting]:
                if ((seq.request_id, None) in self.aborted
                        or (seq.request_id, seq.index) in self.aborted):
                    self._finish(seq, FinishReason.ABORT)
                    if seq not in changed:
                        changed.append(seq)
            self.aborted.clear()   # an abort for an unknown or finished request is moot
        return changed

    def _fast_forward(self, seq: Sequence, weights_version: int) -> FinishReason | None:
        """Append the tokens seq's grammar forces (Steering.forced): logprob 0.0, as sampling
        would have reported. They stay uncomputed: the next step computes them with the sampled
        token as decode rows of seq (Sequence.is_decode)."""
        assert seq.grammar is not None
        limit = min(seq.sampling.max_tokens - seq.num_completion_tokens,
                    self.max_model_len - seq.num_tokens)
        forced = self.steering.forced(seq.grammar, limit, seq.sampling.logprobs_mode == "raw")
        for i, token_id in enumerate(forced, 1):
            seq.token_ids.append(token_id)
            seq.logprobs.append(0.0)
            seq.weights_versions.append(weights_version)
            # The only alternative with a probability above zero is the token itself.
            seq.top_logprobs.append((TopLogprob(token_id, 0.0),) if seq.sampling.logprobs else ())
            seq.num_skipped_draws += 1     # the sampler would have drawn a uniform for it
            self.num_forced_tokens += 1
            # The grammar has taken all of them already: only the last one can complete it.
            complete = i == len(forced) and seq.grammar.is_terminated()
            reason = self._stop_reason(seq, token_id, complete)
            if reason is not None:
                return reason
        return None

    def _stop_reason(self, seq: Sequence, token_id: int,
                     is_complete: bool = False) -> FinishReason | None:
        """is_complete: seq's grammar says its structure is complete."""
        params = seq.sampling
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.STOP
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if is_complete:
            return FinishReason.STOP
        if seq.num_completion_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)


def _order(seq: Sequence) -> tuple[int, int]:
    return seq.sampling.priority, seq.seq_id
