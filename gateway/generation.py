"""One request's generation: token deltas -> incremental detokenizer -> stop strings -> tool-call
parser -> guard -> choice updates (the SSE framing of those updates is `sse.py`).

The detokenizer decodes a sliding window of a few tokens (the vLLM/TGI "prefix offset" scheme):
text is released only when the window decodes to more than its prefix and does not end in an
incomplete UTF-8 sequence (U+FFFD), so no broken character ever leaves. Stop strings are matched
on the text; whatever tail could still grow into a stop string is held back, so no part of one
leaks even when it spans tokens; a choice that matched one is aborted in the engine at once
(`EngineClient.abort(request_id, index)`), its siblings go on. Streaming and non-streaming
responses consume the same updates.
"""
from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine import FinishReason, PreparedRequest, RequestError, TopLogprob
from engine.types import PromptLogprob
from gateway.protocol import BadRequest, InternalError, Unavailable, finish_reason_name
from gateway.guard import GuardedChoice
from gateway.tool_calls import ContentDelta, Delta, ToolCallDelta, ToolCallParser

if TYPE_CHECKING:
    from gateway.admission import Ticket
    from gateway.guard import GuardPlan, Trace
    from gateway.state import Runtime

_CONTEXT_TOKENS = 5   # prompt tokens that seed the window, so the first token decodes in context


class Detokenizer:
    """Token ids in, complete characters out."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool) -> None:
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # transformers' decode is the backend's (the Rust tokenizer's) plus the clean-up of
        # spaces, when configured, and argument handling that cost more than the decode itself:
        # twice per token per stream on the event loop. Both take (ids, skip_special_tokens=).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans = getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self._decoder = backend if backend is not None and not cleans else tokenizer

    @property
    def is_holding(self) -> bool:
        """Whether tokens pushed so far have text not returned yet (an incomplete character)."""
        return len(self._ids) > self._read_offset

    def _decode(self, ids: list[int]) -> str:
        return str(self._decoder.decode(ids, skip_special_tokens=self._skip))

    def push(self, token_ids: Sequence[int], final: bool = False) -> str:
        """The text the new tokens complete; at `final`, whatever is left, complete or not."""
        self._ids.extend(token_ids)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:])
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        # Keep only the last window: text beyond it never changes once released.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix):]


class StopMatcher:
    """Finds the first stop string in the text and holds back tails that may start one."""

    def __init__(self, stop: Sequence[str], include_stop: bool) -> None:
        self.stop = tuple(stop)
        self.include_stop = include_stop
        self._max_len = max((len(s) for s in self.stop), default=0)
        self._text = ""        # released + held
        self._num_released = 0
        self.stopped = False

    @property
    def is_holding(self) -> bool:
        """Whether text fed so far waits (it may begin a stop string)."""
        return not self.stopped and len(self._text) > self._num_released

    def feed(self, text: str, final: bool = False) -> str:
        """Append text; return what can be released now."""
        if self.stopped:
            return ""
        if not self.stop:
            return text
        start = max(self._num_released, len(self._text) - self._max_len + 1)
        self._text += text
        hits = [(at, s) for s in self.stop if (at := self._text.find(s, start)) >= 0]
        if hits:
            at, s = min(hits)
            self.stopped = True
            return self._release(at + len(s) if self.include_stop else at)
        end = len(self._text)
        if not final:
            end -= self._held_len()
        return self._release(end)

    def _held_len(self) -> int:
        tail = self._text[self._num_released:]
        for k in range(min(self._max_len - 1, len(tail)), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stop):
                return k
        return 0

    def _release(self, end: int) -> str:
        out = self._text[self._num_released:end]
        self._num_released = max(self._num_released, end)
        return out


@dataclass(slots=True)
class ChoiceUpdate:
    """New text (and the tokens behind it) of one choice; finish_reason on its last update."""

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[TopLogprob, ...], ...] = ()
    finish_reason: str | None = None
    # With tools: `text` is the content outside calls, and these the call deltas after it.
    tool_calls: tuple[ToolCallDelta, ...] = ()
    # The guard: violations found since the last update (flag mode announces them), and the
    # verdict on a choice's last update when checks ran.
    violations: tuple[dict[str, Any], ...] = ()
    checks: dict[str, Any] | None = None
    closed_early: bool = False     # budget-aware closing steered this choice (so far)
    incomplete: bool = False       # it ended inside a tool call (a stop string cut it)


@dataclass(slots=True)
class _Choice:
    detok: Detokenizer
    stops: StopMatcher
    calls: ToolCallParser | None = None
    guard: GuardedChoice | None = None
    num_tokens: int = 0
    finish_reason: str | None = None


@dataclass(slots=True)
class Outcome:
    """What the request summary line and the usage object need."""

    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0      # of the prompt, from the prefix cache (the first choice's)
    finish_reasons: list[str] = field(default_factory=list)
    ttft_s: float | None = None
    queue_s: float | None = None


class Generation:
    """One request's run through the engine: wait for a slot, generate, turn deltas into updates.

    `updates()` is an async generator; leaving it early (disconnect, error) aborts the request
    and frees its slot in a `finally`.
    """

    def __init__(self, runtime: Runtime, prepared: PreparedRequest, ticket: Ticket, *,
                 skip_special_tokens: bool = True,
                 parse_tool_calls: bool = False, plan: GuardPlan | None = None,
                 trace: Trace | None = None) -> None:
        self.runtime = runtime
        self.prepared = prepared                 # validated, grammar compiled (engine.prepare)
        self.request_id = prepared.request.request_id
        self.prompt_ids = prepared.request.prompt_token_ids
        self.params = params = prepared.request.sampling
        self.ticket = ticket
        self.skip_special_tokens = skip_special_tokens
        self.parse_tool_calls = parse_tool_calls
        self.plan = plan
        self.trace = trace
        if trace is not None:
            trace.max_tokens = params.max_tokens
            trace.close_reserve = (runtime.config.engine.grammar_close_reserve
                                   if params.close_reserve is None else params.close_reserve)
        self.arrival = time.monotonic()
        self.outcome = Outcome(num_prompt_tokens=len(self.prompt_ids))
        self.prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None   # when asked
        # The weights version each choice's tokens were sampled with, in token order.
        self.weights_versions: list[list[int]] = [[] for _ in range(params.n)]
        self.n_per_prompt = params.n              # one prompt (gateway/generation_group.py: many)
        self._num_tokens = [0] * params.n         # completion tokens per choice, so far
        self._is_closed = False

    def prompt_ids_of(self, index: int) -> tuple[int, ...]:
        return self.prompt_ids

    def prompt_logprobs_of(self, index: int) -> tuple[PromptLogprob | None, ...] | None:
        return self.prompt_logprobs

    @property
    def num_completion_tokens(self) -> int:
        """So far (continuous usage stats); the outcome has the final count."""
        return sum(self._num_tokens)

    async def updates(self) -> AsyncGenerator[ChoiceUpdate, None]:
        rt = self.runtime
        engine = rt.engine
        assert engine is not None
        choices = [_Choice(Detokenizer(rt.tokenizer, self.prompt_ids, self.skip_special_tokens),
                           StopMatcher(self.params.stop, self.params.include_stop_str_in_output),
                           ToolCallParser() if self.parse_tool_calls else None)
                   for _ in range(self.params.n)]
        if self.plan is not None and self.plan.needs_guard:
            for i, c in enumerate(choices):
                c.guard = GuardedChoice(self.plan, i, rt, self.request_id, self.trace)
        trace = self.trace
        num_open = len(choices)
        stream = None
        last_token_at: list[float | None] = [None] * len(choices)
        try:
            await self.ticket.wait()
            self.outcome.queue_s = time.monotonic() - self.arrival
            rt.metrics.queue_time.observe(self.outcome.queue_s)
            if trace is not None:
                trace.admitted_at = time.time()
            try:
                stream = engine.add_request(self.prepared)
            except RequestError as exc:
                raise BadRequest(exc.message, exc.param) from None
            rt.active.add(self.request_id)
            async for delta in stream:
                choice = choices[delta.index]
                if delta.prompt_logprobs is not None and self.prompt_logprobs is None:
                    self.prompt_logprobs = delta.prompt_logprobs
                if choice.finish_reason is not None:
                    continue      # it ended on a stop string: the rest of its abort's tail
                self.weights_versions[delta.index] += delta.weights_versions
                if trace is not None:
                    trace.add_tokens(delta.index, delta.token_ids, delta.logprobs,
                                     delta.weights_versions)
                now = time.monotonic()
                if delta.token_ids:
                    rt.metrics.streamed.inc(len(delta.token_ids))
                    if self.outcome.ttft_s is None:
                        self.outcome.ttft_s = now - self.arrival
                        rt.metrics.ttft.observe(self.outcome.ttft_s)
                    prev = last_token_at[delta.index]
                    if prev is not None:
                        rt.metrics.itl.observe((now - prev) / len(delta.token_ids))
                    last_token_at[delta.index] = now
                if delta.finish_reason is FinishReason.ERROR:
                    raise InternalError(delta.error or "the engine failed this request",
                                        code="engine_error")
                if delta.finish_reason is FinishReason.ABORT:
                    # Not our abort (that ends the reading first): the shutdown drain ran out,
                    # or the engine aborted running requests (a weight update in abort mode).
                    if rt.is_draining:
                        raise Unavailable("the server is shutting down; the request was aborted",
                                          code="shutting_down")
                    raise Unavailable("the server aborted the request; retry", code="aborted")
                final = delta.finish_reason is not None
                text = choice.stops.feed(choice.detok.push(delta.token_ids, final), final)
                choice.num_tokens = self._num_tokens[delta.index] = delta.num_completion_tokens
                if delta.index == 0:
                    self.outcome.num_cached_tokens = delta.num_cached_tokens
                if choice.stops.stopped:
                    choice.finish_reason = "stop"
                    if not final:
                        # Only the gateway sees text: end this one sequence in the engine now,
                        # so its blocks are freed whatever its siblings do (n > 1).
                        engine.abort(self.request_id, delta.index)
                elif final:
                    assert delta.finish_reason is not None
                    choice.finish_reason = finish_reason_name(delta.finish_reason)
                calls: tuple[ToolCallDelta, ...] = ()
                is_cut = False
                if choice.calls is not None:
                    text, calls = _split(choice.calls.feed(text) + (
                        choice.calls.finish() if choice.finish_reason is not None else []))
                    if choice.finish_reason is not None:
                        choice.finish_reason = choice.calls.finish_reason(choice.finish_reason)
                        is_cut = choice.calls.is_cut
                update = ChoiceUpdate(delta.index, text, delta.token_ids, delta.logprobs,
                                      delta.top_logprobs, choice.finish_reason, calls,
                                      closed_early=delta.closed_early, incomplete=is_cut)
                if choice.guard is not None:
                    self._guard(choice, update)
                    if choice.finish_reason == "content_filter" and not final:
                        engine.abort(self.request_id, delta.index)    # blocked: as a stop string
                    if choice.guard.session_facts is not None:    # kept before the end leaves
                        assert self.plan is not None and self.plan.session_id is not None
                        await rt.sessions.save(self.plan.session_id, choice.guard.session_facts)
                        choice.guard.session_facts = None
                if choice.finish_reason is not None:
                    num_open -= 1
                    if trace is not None:
                        trace.finish_choice(delta.index, choice.finish_reason, update.checks)
                yield update
                if num_open == 0:
                    if trace is not None:    # a shared store has it before the last bytes leave
                        await rt.traces.persist(trace)
                    break
        finally:
            if stream is not None:
                engine.abort(self.request_id)      # a no-op when it already finished
                rt.active.discard(self.request_id)
            self.ticket.release()
            self.outcome.num_completion_tokens = sum(c.num_tokens for c in choices)
            self.outcome.finish_reasons = [c.finish_reason or "abort" for c in choices]

    @staticmethod
    def _guard(choice: _Choice, u: ChoiceUpdate) -> None:
        """What the guard lets out of this update; a block ends the choice "content_filter"."""
        assert choice.guard is not None
        r = choice.guard.step(u.text, u.tool_calls, u.token_ids, u.logprobs, u.top_logprobs,
                              choice.calls, choice.finish_reason,
                              choice.detok.is_holding or choice.stops.is_holding)
        u.text, u.tool_calls = r.text, r.calls
        u.token_ids, u.logprobs, u.top_logprobs = r.token_ids, r.logprobs, r.top_logprobs
        u.violations, u.checks = tuple(r.violations), r.verdict
        if r.blocked:
            choice.finish_reason = u.finish_reason = "content_filter"

    def close(self) -> None:
        """Once, when the response ends (even if `updates()` never ran): slot and metrics."""
        self.ticket.release()
        if self._is_closed:
            return
        self._is_closed = True
        if self.trace is not None:
            self.runtime.traces.close(self.trace)
        if self.outcome.finish_reasons:
            self.runtime.metrics.observe_finished(
                self.outcome.finish_reasons, self.outcome.num_prompt_tokens,
                self.outcome.num_completion_tokens, time.monotonic() - self.arrival)


def _split(deltas: list[Delta]) -> tuple[str, tuple[ToolCallDelta, ...]]:
    """Content text and call deltas. The grammar lets nothing but calls follow the first call,
    so all content comes first."""
    text = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    return text, tuple(d for d in deltas if isinstance(d, ToolCallDelta))
