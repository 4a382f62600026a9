"""The guard: between the detokenizer and the SSE chunks, it decides what text may be released.

off: everything is released. flag: everything is released as generated; violations ride along.
block: text is held; it is released only up to where every check has cleared it and, with
release "unit", only whole units (a top-level JSON value, a sentence) — "final" holds all of it
until finish. After the first violation nothing more is ever released (the block guarantee).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from gateway.guard.checks import Check, CheckContext, Violation, build_checks
from gateway.guard.policy import Policy
from grammars.closing import JsonScan

# on_event(name, fields): the hook for traces and metrics ("check_violation", "guard_blocked",
# "guard_finished").
EventHook = Callable[[str, dict[str, Any]], None]


@dataclass(slots=True)
class GuardStep:
    released: str = ""                                          # text the caller may send now
    violations: list[Violation] = field(default_factory=list)   # new since the last step
    blocked: bool = False    # block mode failed: end the stream with "content_filter"


class _Units:
    """Offsets where units end: top-level JSON values for JSON, sentences for text."""

    def __init__(self, is_json: bool) -> None:
        self.is_json = is_json
        self.ends: list[int] = []   # unit ends not yet released, ascending
        self.pos = 0
        self.json = JsonScan()      # the same JSON lexer budget-aware closing uses
        self.prev = ""

    def feed(self, chunk: str) -> None:
        for ch in chunk:
            self.pos += 1
            if self.is_json:
                if self.json.step(ch):
                    self.ends.append(self.pos)
            elif ch == "\n" or (ch in " \t" and self.prev in ".!?"):
                self.ends.append(self.pos)
            self.prev = ch

    def last_end_within(self, limit: int) -> int:
        """The end of the last completed unit at or before `limit` (0 if none)."""
        best = 0
        while self.ends and self.ends[0] <= limit:
            best = self.ends.pop(0)
        return best


class Guard:
    """Fed detokenized text increments; returns what may be released and new violations."""

    def __init__(self, policy: Policy, context: CheckContext | None = None,
                 checks: list[Check] | None = None, on_event: EventHook | None = None) -> None:
        self.policy = policy
        self.context = context or CheckContext()
        self.checks = [] if policy.mode == "off" else (
            checks if checks is not None else build_checks(policy.checks, self.context))
        self.on_event = on_event
        self.units = _Units(self.context.is_structured)
        self.text = ""
        self.num_released = 0
        self.violations: list[Violation] = []
        self.blocked = False
        self.finished = False
        self.check_seconds = 0.0   # CPU time spent in checks, for metrics

    @property
    def is_holding(self) -> bool:
        return self.policy.mode == "block"

    @property
    def is_quoting(self) -> bool:
        """Whether verdicts may quote what they found: in flag mode it was sent already; in
        block mode a verdict names the rule and the offsets, never the withheld value."""
        return self.policy.mode == "flag"

    def feed(self, chunk: str) -> GuardStep:
        assert not self.finished
        self.text += chunk
        if not self.checks:
            return self._release_to(len(self.text), [])
        t0 = time.perf_counter()
        new = [v for c in self.checks for v in c.feed(chunk)]
        if self.is_holding:
            self.units.feed(chunk)
        self.check_seconds += time.perf_counter() - t0
        if self.policy.mode == "flag" or self.policy.mode == "off":
            return self._release_to(len(self.text), new)
        if self.policy.release == "final":
            limit = 0
        else:
            limit = min(c.cleared for c in self.checks)
            if self.policy.release == "unit":
                limit = max(self.units.last_end_within(limit), self.num_released)
        return self._release_to(limit, new)

    def check_tool_call(self, call: dict[str, Any]) -> GuardStep:
        """A completed tool call ({"name", "arguments"}): in block mode send it only if this passes."""
        new = [v for c in self.checks for v in c.check_call(call, self.context)]
        return self._release_to(self.num_released, new)

    def finish(self, finish_reason: str | None,
               tool_calls: list[dict[str, Any]] | None = None) -> GuardStep:
        """Judge the whole text; release the rest if nothing failed."""
        assert not self.finished
        self.finished = True
        ctx = replace(self.context, finish_reason=finish_reason, tool_calls=tool_calls or [])
        t0 = time.perf_counter()
        new = [v for c in self.checks for v in c.finish(self.text, ctx)]
        self.check_seconds += time.perf_counter() - t0
        step = self._release_to(len(self.text), new)
        self._emit("guard_finished", self.verdict())
        return step

    def _release_to(self, limit: int, new: list[Violation]) -> GuardStep:
        # A violation already reported (a deny match seen by feed and again at finish) is not news.
        new = [v for v in new if v not in self.violations]
        for v in new:
            self._emit("check_violation", v.to_dict(self.is_quoting))
        self.violations += new
        if new and self.policy.mode == "block" and not self.blocked:
            self.blocked = True
            self._emit("guard_blocked", {"num_released": self.num_released})
        if self.blocked or limit <= self.num_released:
            return GuardStep("", new, self.blocked)
        released = self.text[self.num_released:limit]
        self.num_released = limit
        return GuardStep(released, new, False)

    def verdict(self) -> dict[str, Any]:
        """The `plumbline.checks` object of the final chunk / non-streaming response."""
        return {"mode": self.policy.mode,
                "passed": not self.violations,
                "blocked": self.blocked,
                "checks": [c.name for c in self.checks],
                "violations": [v.to_dict(self.is_quoting) for v in self.violations]}

    def _emit(self, name: str, fields: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(name, fields)
