"""What one choice may send: the guard applied to its content text, tool-call deltas and tokens.

Sits in `Generation.updates()` after the detokenizer, the stop strings and the tool-call
parser. Content text goes through `Guard.feed`; each tool call is judged when the parser sees
it complete; `Guard.finish` judges the whole at the end.

In block mode everything that could reveal held text is held with it: a token's id and logprob
entry leave only once all the text up to the end of that token has been released (a logprob
entry names its token); while the detokenizer or a stop-string prefix still holds part of a
token's text, the token's end is not known yet and it waits for it. Every check judges a tool
call (deny, tool_args, consistency) before any byte of it leaves; its deltas leave once the
content before them has been released and the call has passed (with release "final", only at
finish, all of them if nothing failed). Where tools are
active, logprob entries are held to the end: the parser holds markup that is neither content
nor yet a judged call, so no content offset tells when such a token's text is safe. After a
violation nothing more leaves: the choice ends with "content_filter".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from engine import TopLogprob
from gateway.tool_calls import ToolCallDelta, ToolCallParser

if TYPE_CHECKING:
    from gateway.guard.facts import Assertion
    from gateway.guard.plan import GuardPlan
    from gateway.guard.traces import Trace
    from gateway.metrics import Metrics
    from gateway.state import Runtime

_AT_FINISH = math.inf    # the held-token offset of tokens released only at the end
_UNKNOWN = -1.0          # ... of tokens whose text the detokenizer or stop matcher still holds


@dataclass(slots=True)
class ChoiceRelease:
    """What one choice may send after an update: text, call deltas, tokens, the guard's news."""

    text: str = ""
    calls: tuple[ToolCallDelta, ...] = ()
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[TopLogprob, ...], ...] = ()
    violations: list[dict[str, Any]] = field(default_factory=list)   # new since the last step
    blocked: bool = False
    verdict: dict[str, Any] | None = None    # at the end, when checks ran


class GuardedChoice:
    """One choice's guard, and what it holds back."""

    def __init__(self, plan: GuardPlan, index: int, runtime: Runtime, request_id: str,
                 trace: Trace | None = None) -> None:
        self.plan = plan
        self.index = index
        self.metrics: Metrics = runtime.metrics
        self.runtime = runtime
        self.request_id = request_id
        self.trace = trace
        on_event = None
        if trace is not None:
            def on_event(name: str, fields: dict[str, Any]) -> None:
                trace.event(name, index, fields)
        self.guard = plan.new_guard(on_event)
        self.is_holding = self.guard.is_holding
        self.is_checking = plan.policy.mode != "off"
        self.num_calls_checked = 0
        self.passed_calls: set[int] = set()
        self.pending_calls: list[ToolCallDelta] = []
        # (end offset in the guard's text, token ids, logprobs, top logprobs), oldest first
        self.held_tokens: list[tuple[float, tuple[int, ...], tuple[float, ...],
                                     tuple[tuple[TopLogprob, ...], ...]]] = []
        self.session_facts: list[Assertion] | None = None   # what the session keeps, at the end

    def step(self, text: str, calls: Sequence[ToolCallDelta], token_ids: tuple[int, ...],
             logprobs: tuple[float, ...], top_logprobs: tuple[tuple[TopLogprob, ...], ...],
             parser: ToolCallParser | None, finish_reason: str | None,
             is_text_pending: bool = False) -> ChoiceRelease:
        """Feed one update's content and call deltas; what may be sent now. is_text_pending:
        the detokenizer or the stop matcher still holds text of the tokens so far."""
        g = self.guard
        out = ChoiceRelease()
        new = []
        calls_made: list[dict[str, Any]] = []
        if text:
            s = g.feed(text)
            out.text, new = s.released, list(s.violations)
        if parser is not None:
            for call in parser.tool_calls[self.num_calls_checked:]:
                if not call.is_complete:
                    break
                s = g.check_tool_call({"name": call.name, "arguments": call.arguments})
                new += s.violations
                if not s.violations:
                    self.passed_calls.add(self.num_calls_checked)
                self.num_calls_checked += 1
        if finish_reason is not None:
            calls_made = [{"name": c.name, "arguments": c.arguments}
                          for c in (parser.tool_calls if parser is not None else ())]
            s = g.finish(finish_reason, calls_made)
            out.text += s.released
            new += s.violations
        out.violations = [v.to_dict(g.is_quoting) for v in new]
        if g.blocked:
            out.text, out.blocked = "", True
            self.pending_calls.clear()
            self.held_tokens.clear()
            self._end(out, calls_made)
            return out
        if not self.is_holding:
            out.calls, out.token_ids, out.logprobs, out.top_logprobs = (
                tuple(calls), token_ids, logprobs, top_logprobs)
        else:
            if is_text_pending:            # where these tokens' text ends is not known yet
                end = _UNKNOWN
            else:                          # all their text is in the guard: settle the waiting
                end = _AT_FINISH if parser is not None else len(g.text)
                held = self.held_tokens    # waiting entries are the newest: walk back to them
                i = len(held)
                while i and held[i - 1][0] == _UNKNOWN:
                    i -= 1
                    _, ids, lps, tops = held[i]
                    held[i] = (end, ids, lps, tops)
            if token_ids:
                self.held_tokens.append((end, token_ids, logprobs, top_logprobs))
            self.pending_calls += calls
            self._release_held(out, done=finish_reason is not None)
        if finish_reason is not None:
            self._end(out, calls_made)
        return out

    def _release_held(self, out: ChoiceRelease, done: bool) -> None:
        g = self.guard
        ids: list[int] = []
        lps: list[float] = []
        tops: list[tuple[TopLogprob, ...]] = []
        while self.held_tokens and (done or 0 <= self.held_tokens[0][0] <= g.num_released):
            _, t, lp, top = self.held_tokens.pop(0)
            ids += t
            lps += lp
            tops += top
        out.token_ids, out.logprobs, out.top_logprobs = tuple(ids), tuple(lps), tuple(tops)
        # with release "final" nothing leaves before the end, calls included
        if done or (g.num_released == len(g.text) and self.plan.policy.release != "final"):
            # deltas keep their order: stop at the first call still waiting for its verdict
            n = 0
            while n < len(self.pending_calls) and (
                    done or self.pending_calls[n].index in self.passed_calls):
                n += 1
            out.calls = tuple(self.pending_calls[:n])
            del self.pending_calls[:n]

    def _end(self, out: ChoiceRelease, calls_made: list[dict[str, Any]]) -> None:
        verdict = self.guard.verdict() if self.is_checking else None
        out.verdict = verdict
        if verdict is not None:
            self.metrics.observe_verdict(verdict)
        plan = self.plan
        if plan.session_id is not None and self.index == 0 and not self.guard.blocked:
            # saved by Generation.updates before this update leaves (the store may be remote)
            self.session_facts = plan.session_facts(self.guard.text, calls_made,
                                                    f"response {self.request_id}")
