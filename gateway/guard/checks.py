"""Pre-return checks: each is fed the output incrementally and judges the whole at finish.

A check also says how far it has cleared the text (`cleared`): no violation it could still
report will start before that offset. The guard releases held text only up to the smallest
`cleared`, which is what makes the block guarantee hold.
"""
from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

from jsonschema import validators  # type: ignore[import-untyped]

from gateway.guard.facts import AssertionBuffer, escape_token
from gateway.guard.pointers import JsonPointerParser


@dataclass(frozen=True, slots=True)
class Violation:
    check: str
    message: str
    start: int   # character offsets into the output, [start, end)
    end: int

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "message": self.message, "start": self.start, "end": self.end}


@dataclass(slots=True)
class CheckContext:
    """What a check may know about the request, and at finish about how it ended."""
    schema: dict[str, Any] | None = None              # response_format json_schema
    tools: list[dict[str, Any]] = field(default_factory=list)   # OpenAI tool definitions
    is_structured: bool = False                       # output constrained to JSON
    assertions: AssertionBuffer = field(default_factory=AssertionBuffer)
    finish_reason: str | None = None                  # set for finish()
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"name", "arguments"}


class Check:
    """Base: feed chunks, then finish on the whole text."""
    name = "check"
    final_only = False   # judges only at finish: nothing is cleared before

    def __init__(self, setting: Any, context: CheckContext) -> None:
        self.setting, self.context = setting, context
        self.length = 0

    @property
    def cleared(self) -> int:
        return 0 if self.final_only else self.length

    def feed(self, chunk: str) -> list[Violation]:
        self.length += len(chunk)
        return []

    def finish(self, final_text: str, context: CheckContext) -> list[Violation]:
        return []


CHECKS: dict[str, type[Check]] = {}


def register_check(name: str) -> Callable[[type[Check]], type[Check]]:
    """Class decorator: `checks: {name: setting}` in a policy builds this check (the settings
    a policy accepts for it are the policy module's business)."""
    def wrap(cls: type[Check]) -> type[Check]:
        cls.name = name
        CHECKS[name] = cls
        return cls
    return wrap


def is_enabled(setting: Any) -> bool:
    return setting not in (None, False, "off", [], {})


def build_checks(config: dict[str, Any], context: CheckContext | None = None) -> list[Check]:
    """The enabled checks of a (validated) checks config, in registry order."""
    context = context or CheckContext()
    return [cls(config[name], context) for name, cls in CHECKS.items()
            if is_enabled(config.get(name))]


# -- schema -------------------------------------------------------------------------------------

def _spans(text: str) -> dict[str, tuple[int, int]]:
    return {ptr: (s, e) for ptr, _, s, e in JsonPointerParser().feed(text)}


def _pointer(path: Any) -> str:
    return "".join("/" + escape_token(str(p)) for p in path)


def validate_json(text: str, schema: dict[str, Any], check: str, prefix: str = "",
                  base: int = 0) -> list[Violation]:
    """jsonschema with formats; each error located at the offending value when we can."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return [Violation(check, f"{prefix}not valid JSON: {e}", base, base + len(text))]
    cls = validators.validator_for(schema)
    errors = list(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(value))
    if not errors:
        return []
    spans = _spans(text)
    out = []
    for err in errors:
        ptr = _pointer(err.absolute_path)
        lo, hi = spans.get(ptr, (0, len(text)))
        out.append(Violation(check, f"{prefix}{ptr or '/'}: {err.message}", base + lo, base + hi))
    return out


@register_check("schema")
class SchemaCheck(Check):
    @property
    def cleared(self) -> int:
        return 0 if self.context.schema is not None else self.length

    def finish(self, final_text: str, context: CheckContext) -> list[Violation]:
        if context.schema is None or context.finish_reason == "length":
            return []   # a cut-off document is the truncation check's finding
        return validate_json(final_text, context.schema, self.name)


# -- tool_args ----------------------------------------------------------------------------------

@register_check("tool_args")
class ToolArgsCheck(Check):
    """Tool calls are judged by the guard one call at a time (`check_call`) and again at finish."""

    def check_call(self, call: dict[str, Any], context: CheckContext) -> list[Violation]:
        name, args = call.get("name"), call.get("arguments", "")
        tools = {t.get("function", {}).get("name"): t.get("function", {}) for t in context.tools}
        if name not in tools:
            return [Violation(self.name, f"tool {name!r} does not exist", 0, 0)]
        params = tools[name].get("parameters") or {"type": "object"}
        return validate_json(args or "{}", params, self.name, prefix=f"tool {name} arguments ")

    def finish(self, final_text: str, context: CheckContext) -> list[Violation]:
        if context.finish_reason == "length":
            return []
        return [v for call in context.tool_calls for v in self.check_call(call, context)]


# -- truncation ---------------------------------------------------------------------------------

@register_check("truncation")
class TruncationCheck(Check):
    @property
    def cleared(self) -> int:
        # Structured output is judged whole: release "stream" must not leak a prefix of a
        # document that max_tokens then cuts off.
        return 0 if self.context.is_structured else self.length

    def finish(self, final_text: str, context: CheckContext) -> list[Violation]:
        if context.finish_reason != "length":
            return []
        if context.is_structured:
            return [Violation(self.name, "structured output cut off by max_tokens", 0, len(final_text))]
        if context.tool_calls:
            return [Violation(self.name, "tool call cut off by max_tokens", 0, len(final_text))]
        return []


# -- deny ---------------------------------------------------------------------------------------

def _max_width(pattern: str) -> int:
    # re's own parser knows a pattern's widest match; imported by name as it has no stubs.
    sre_parse: Any = importlib.import_module("re._parser")
    try:
        hi = sre_parse.parse(pattern).getwidth()[1]
    except Exception:
        return DenyCheck.max_match
    return max(1, min(int(hi), DenyCheck.max_match))


@register_check("deny")
class DenyCheck(Check):
    """Regexes over the output, found across chunk boundaries.

    Each feed re-scans only the last `max_match` characters before the new text plus the new
    text, so a match up to `max_match` characters long is found as soon as it is complete,
    whatever the chunking; the cost per feed is bounded. Text more than `max_match` characters
    behind the end is cleared. Longer matches (unbounded patterns like `a.*b`) are still found
    at finish, which re-scans the whole text, but only "final" release holds them back.
    """
    max_match = 256

    def __init__(self, setting: Any, context: CheckContext) -> None:
        super().__init__(setting, context)
        # Compiled one by one: inline flags like `(?i)` only work at a pattern's start.
        self.patterns = [re.compile(p) for p in setting]
        # Bounded patterns need only their own longest match as a tail.
        widest = max((_max_width(p) for p in setting), default=1)
        self.max_match = min(widest, DenyCheck.max_match)
        self.text = ""
        self.seen: set[tuple[int, int]] = set()   # (pattern, match start)

    @property
    def cleared(self) -> int:
        return max(0, self.length - self.max_match + 1)

    def feed(self, chunk: str) -> list[Violation]:
        start = max(0, self.length - self.max_match)
        self.text += chunk
        self.length += len(chunk)
        return self._scan(start)

    def _scan(self, start: int) -> list[Violation]:
        out = []
        for i, pattern in enumerate(self.patterns):
            for m in pattern.finditer(self.text, start):
                if m.end() == m.start() or (i, m.start()) in self.seen:
                    continue
                self.seen.add((i, m.start()))
                # The pattern, never the match: a blocked secret must not leave in the verdict.
                out.append(Violation(self.name, f"denied pattern {pattern.pattern!r} matched",
                                     m.start(), m.end()))
        out.sort(key=lambda v: v.start)
        return out

    def finish(self, final_text: str, context: CheckContext) -> list[Violation]:
        self.text, self.length = final_text, len(final_text)
        return self._scan(0)


# -- arithmetic ---------------------------------------------------------------------------------

_NUM = r"-?\d{1,20}(?:\.\d{1,12})?"
# Binary claims `a op b = c`. Not preceded by a word char, `.`, `-`, `/` or `=` (versions 1.2.3,
# dates 2024-01-05 or 1/2/2024, chains x=3-1=2) nor followed by one (`= 12.5.1`, `= 51st`). `x` as times only
# between spaces, so hex and dimensions like `3x4` stay out.
_CLAIM = re.compile(
    rf"(?<![\w.\-/^=])({_NUM})\s*([+\-*/×÷]|\s[x]\s)\s*({_NUM})\s*=\s*({_NUM})(?![\w\-/^]|\.\d|[*/+^])")
# The last character no claim can contain: a claim in the making starts after it.
_NOT_CLAIM_TAIL = re.compile(r"[^\d\s.+\-*/×÷x=][\d\s.+\-*/×÷x=]*\Z")
_MAX_CLAIM = 3 * 34 + 16   # longest claim the pattern can match, with some spacing


def _evaluate(a: Decimal, op: str, b: Decimal) -> Decimal | None:
    op = op.strip()
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op in ("*", "×", "x"):
        return a * b
    if b == 0:
        return None
    return a / b


def _claim_holds(a: str, op: str, b: str, c: str) -> bool | None:
    try:
        x, y, claimed = Decimal(a), Decimal(b), Decimal(c)
        actual = _evaluate(x, op, y)
    except InvalidOperation:
        return None
    if actual is None:
        return None
    places = max(len(c.partition(".")[2]), 0)
    # A rounded claim passes: 10 / 3 = 3.33 is fine, 10 / 3 = 3.4 is not.
    return abs(actual - claimed) <= Decimal(5) * Decimal(10) ** (-places - 1) if places or op.strip() in "/÷" \
        else actual == claimed


@register_check("arithmetic")
class ArithmeticCheck(Check):
    def __init__(self, setting: Any, context: CheckContext) -> None:
        super().__init__(setting, context)
        self.text = ""
        self.scan_from = 0

        self.safe = 0   # just past the last character that cannot be part of a claim

    @property
    def cleared(self) -> int:
        return max(self.scan_from, self.safe, self.length - _MAX_CLAIM)

    def feed(self, chunk: str) -> list[Violation]:
        self.text += chunk
        self.length += len(chunk)
        m = _NOT_CLAIM_TAIL.search(chunk)
        if m is not None:
            self.safe = self.length - len(chunk) + m.end()
        # Only claims followed by two more characters are final: `= 5` may become `= 51`,
        # and `= 3.` may become `= 3.5`.
        out = self._scan(self.length - 2)
        # Keep the text bounded: nothing before the tail can start a claim any more.
        cut = max(0, self.length - _MAX_CLAIM) - (self.length - len(self.text))
        if cut > 4096:
            self.text = self.text[cut:]
        return out

    def _scan(self, limit: int) -> list[Violation]:
        base = self.length - len(self.text)
        out = []
        for m in _CLAIM.finditer(self.text, max(0, self.scan_from - base)):
            if base + m.end() > limit:
                break
            self.scan_from = base + m.end()
            if _claim_holds(*m.groups()) is False:
                out.append(Violation(self.name, f"wrong arithmetic: {m.group()!r}",
                                     base + m.start(), base + m.end()))
        return out

    def finish(self, final_text: str, context: CheckContext) -> list[Violation]:
        return self._scan(self.length)


# -- consistency --------------------------------------------------------------------------------

@register_check("consistency")
class ConsistencyCheck(Check):
    """Every completed JSON leaf of the output against the assertion buffer."""

    def __init__(self, setting: Any, context: CheckContext) -> None:
        super().__init__(setting, context)
        self.parser = JsonPointerParser()

    @property
    def cleared(self) -> int:
        # A leaf is judged when complete; an open scalar or key may still conflict.
        p = self.parser
        return p.token_start if p.token_start >= 0 else self.length

    def feed(self, chunk: str) -> list[Violation]:
        self.length += len(chunk)
        if not self.context.assertions:
            return []
        return [v for leaf in self.parser.feed(chunk) if (v := self._judge(*leaf))]

    def _judge(self, ptr: str, value: Any, start: int, end: int, prefix: str = "") -> Violation | None:
        fact = self.context.assertions.conflict(ptr, value)
        if fact is None:
            return None
        return Violation(self.name, f"{prefix}{ptr} = {json.dumps(value)} contradicts "
                         f"{json.dumps(fact.value)} from {fact.source}", start, end)

    def finish(self, final_text: str, context: CheckContext) -> list[Violation]:
        out = []
        for call in context.tool_calls:
            try:
                args = json.loads(call.get("arguments") or "{}")
            except ValueError:
                continue
            for ptr, value, _, _ in JsonPointerParser().feed(json.dumps(args)):
                v = self._judge(ptr, value, 0, 0, prefix=f"tool {call.get('name')} argument ")
                if v:
                    out.append(v)
        return out
