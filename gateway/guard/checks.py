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
from typing import Any, Callable

from jsonschema import validators  # type: ignore[import-untyped]

from gateway.guard.claims import CLAIM, MAX_CLAIM, NOT_CLAIM_TAIL, claim_holds
from gateway.guard.facts import AssertionBuffer
from gateway.guard.pointers import JsonPointerParser, leaf_spans, pointer_of


@dataclass(frozen=True, slots=True)
class Violation:
    """`message` names the check's rule (a pattern, a JSON pointer, a schema keyword) and never
    quotes the output; `quote` is the offending value, which only flag mode may show (its text
    was sent already). Offsets locate it in the output."""

    check: str
    message: str
    start: int   # character offsets into the output, [start, end)
    end: int
    quote: str | None = None

    @property
    def full_message(self) -> str:
        return self.message if self.quote is None else f"{self.message}: {self.quote}"

    def to_dict(self, quoted: bool = False) -> dict[str, Any]:
        return {"check": self.check, "message": self.full_message if quoted else self.message,
                "start": self.start, "end": self.end}


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

    def check_call(self, call: dict[str, Any], context: CheckContext) -> list[Violation]:
        """A completed tool call ({"name", "arguments"}), judged before any byte of it is sent."""
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

def validate_json(text: str, schema: dict[str, Any], check: str, prefix: str = "",
                  base: int = 0, quote_prefix: str = "") -> list[Violation]:
    """jsonschema with formats; each error located at the offending value when we can."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return [Violation(check, f"{prefix}not valid JSON", base, base + len(text),
                          f"{quote_prefix}{e}")]
    cls = validators.validator_for(schema)
    errors = list(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(value))
    if not errors:
        return []
    spans = leaf_spans(text)
    out = []
    for err in errors:
        ptr = pointer_of(err.absolute_path)
        lo, hi = spans.get(ptr, (0, len(text)))
        # jsonschema's message quotes the offending value: only flag mode shows it
        rule = f"fails {err.validator!r} at schema {pointer_of(err.absolute_schema_path) or '/'}"
        out.append(Violation(check, f"{prefix}{ptr or '/'}: {rule}", base + lo, base + hi,
                             f"{quote_prefix}{err.message}"))
    return out


@register_check("schema")
class SchemaCheck(Check):
    @property
    def cleared(self) -> int:
        return 0 if self.context.schema is not None else self.length

    def finish(self, final_text: str, context: CheckContext) -> list[Violation]:
        if context.schema is None or context.finish_reason == "length":
            return []   # a cut-off document is the truncation check's finding
        if context.tool_calls:
            return []   # tools beside a response format: a call, not a document, answered
        return validate_json(final_text, context.schema, self.name)


# -- tool_args ----------------------------------------------------------------------------------

@register_check("tool_args")
class ToolArgsCheck(Check):
    """Tool calls are judged by the guard one call at a time (`check_call`) and again at finish."""

    def check_call(self, call: dict[str, Any], context: CheckContext) -> list[Violation]:
        name, args = call.get("name"), call.get("arguments", "")
        tools = {t.get("function", {}).get("name"): t.get("function", {}) for t in context.tools}
        if name not in tools:
            return [Violation(self.name, "a tool call names a tool the request does not offer",
                              0, 0, f"{name!r} does not exist")]
        params = tools[name].get("parameters") or {"type": "object"}
        # which tool was called is part of the call: only flag mode's quote names it
        return validate_json(args or "{}", params, self.name, prefix="a tool call's arguments ",
                             quote_prefix=f"tool {name}: ")

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

def _max_width(pattern: str) -> int | None:
    """The longest text a match of `pattern` spans, lookarounds included; None when that has no
    bound within DenyCheck.max_match (a `*`, `+` or `{n,}`, a longer literal, or a lookahead or
    lookbehind, which reads past the match)."""
    # re's own parser knows a pattern's widest match; imported by name as it has no stubs.
    sre_parse: Any = importlib.import_module("re._parser")
    try:
        tree = sre_parse.parse(pattern)
        hi = tree.getwidth()[1]
    except Exception:
        return None
    if hi > DenyCheck.max_match or _has_lookaround(tree):
        return None
    return max(1, int(hi))


def _has_lookaround(tree: Any) -> bool:
    """Whether a parsed pattern (re._parser.SubPattern) holds a lookahead or lookbehind."""
    def parts(arg: Any) -> Any:        # the sub-patterns inside an opcode's argument
        for item in arg if isinstance(arg, (list, tuple)) else (arg,):
            if hasattr(item, "getwidth"):
                yield item
            elif isinstance(item, (list, tuple)):
                yield from parts(item)
    return any(str(op) in ("ASSERT", "ASSERT_NOT") or any(_has_lookaround(p) for p in parts(arg))
               for op, arg in tree)


@register_check("deny")
class DenyCheck(Check):
    """Regexes over the output, its tool calls (name and arguments) and, in JSON output, the
    decoded value of every string; found across chunk boundaries.

    Each feed re-scans only the last `max_match` characters before the new text plus the new
    text, so a match up to `max_match` characters long is found as soon as it is complete,
    whatever the chunking; the cost per feed is bounded. Text more than `max_match` characters
    behind the end is cleared. A pattern whose match has no such bound (`a.*b`, a lookahead,
    over 256 characters) holds the whole output to the end, where finish scans it all: its
    first characters must not leave before the rest is seen. In JSON output an open string is
    held until it closes and its decoded value (escapes resolved) is scanned.
    """
    max_match = 256

    def __init__(self, setting: Any, context: CheckContext) -> None:
        super().__init__(setting, context)
        # Compiled one by one: inline flags like `(?i)` only work at a pattern's start.
        self.patterns = [re.compile(p) for p in setting]
        widths = [_max_width(p) for p in setting]
        self.is_bounded = None not in widths
        # Bounded patterns need only their own longest match as a tail.
        self.max_match = max((w for w in widths if w is not None), default=1)
        self.text = ""
        self.seen: set[tuple[int, int]] = set()   # (pattern, match start)
        self.strings = JsonPointerParser() if context.is_structured else None

    @property
    def cleared(self) -> int:
        if not self.is_bounded:
            return 0
        cleared = max(0, self.length - self.max_match + 1)
        if self.strings is not None and self.strings.token_start >= 0:
            cleared = min(cleared, self.strings.token_start)    # a string still open
        return cleared

    def feed(self, chunk: str) -> list[Violation]:
        start = max(0, self.length - self.max_match)
        self.text += chunk
        self.length += len(chunk)
        out = self._scan(start)
        if self.strings is not None:
            for ptr, value, lo, hi in self.strings.feed(chunk):
                if isinstance(value, str):
                    out += self._scan_value(value, lo, hi, f"the string at {ptr or '/'}")
        return out

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

    def _scan_value(self, value: str, start: int, end: int, where: str) -> list[Violation]:
        """A decoded value (a JSON string, a tool call's name or arguments) as a whole."""
        return [Violation(self.name, f"denied pattern {p.pattern!r} matched in {where}",
                          start, end)
                for p in self.patterns if any(m.end() > m.start() for m in p.finditer(value))]

    def check_call(self, call: dict[str, Any], context: CheckContext) -> list[Violation]:
        name, args = str(call.get("name") or ""), str(call.get("arguments") or "")
        out = self._scan_value(name, 0, 0, "a tool call's name")
        out += self._scan_value(args, 0, 0, "a tool call's arguments")
        for ptr, value, _, _ in JsonPointerParser().feed(args):
            if isinstance(value, str):
                out += self._scan_value(value, 0, 0, f"a tool call's argument {ptr}")
        return out

    def finish(self, final_text: str, context: CheckContext) -> list[Violation]:
        self.text, self.length = final_text, len(final_text)
        out = self._scan(0)
        for call in context.tool_calls:
            out += self.check_call(call, context)
        return out


# -- arithmetic ---------------------------------------------------------------------------------

@register_check("arithmetic")
class ArithmeticCheck(Check):
    def __init__(self, setting: Any, context: CheckContext) -> None:
        super().__init__(setting, context)
        self.text = ""
        self.scan_from = 0

        self.safe = 0   # just past the last character that cannot be part of a claim
        self.pending = 0   # where the first complete claim not judged yet starts (else length)

    @property
    def cleared(self) -> int:
        # Past the judged claims and any text no claim can reach, but never past the start of
        # a claim that is complete and not judged yet (`17 * 3 = 50,` waits for its verdict).
        return min(max(self.scan_from, self.safe, self.length - MAX_CLAIM), self.pending)

    def feed(self, chunk: str) -> list[Violation]:
        self.text += chunk
        self.length += len(chunk)
        m = NOT_CLAIM_TAIL.search(chunk)
        if m is not None:
            self.safe = self.length - len(chunk) + m.end()
        # Only claims followed by two more characters are final: `= 5` may become `= 51`,
        # and `= 3.` may become `= 3.5`.
        out = self._scan(self.length - 2)
        base = self.length - len(self.text)
        waiting = CLAIM.search(self.text, max(0, self.scan_from - base))
        self.pending = self.length if waiting is None else base + waiting.start()
        # Keep the text bounded: nothing before the tail can start a claim any more.
        cut = max(0, self.length - MAX_CLAIM) - (self.length - len(self.text))
        if cut > 4096:
            self.text = self.text[cut:]
        return out

    def _scan(self, limit: int) -> list[Violation]:
        base = self.length - len(self.text)
        out = []
        for m in CLAIM.finditer(self.text, max(0, self.scan_from - base)):
            if base + m.end() > limit:
                break
            self.scan_from = base + m.end()
            if claim_holds(*m.groups()) is False:
                out.append(Violation(self.name, "wrong arithmetic: the stated result does "
                                     "not follow from the operation", base + m.start(),
                                     base + m.end(), repr(m.group())))
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

    def _judge(self, ptr: str, value: Any, start: int, end: int, prefix: str = "",
               quote_prefix: str = "") -> Violation | None:
        fact = self.context.assertions.conflict(ptr, value)
        if fact is None:
            return None
        return Violation(self.name, f"{prefix}{ptr} contradicts the value from {fact.source}",
                         start, end,
                         f"{quote_prefix}{json.dumps(value)} against {json.dumps(fact.value)}")

    def check_call(self, call: dict[str, Any], context: CheckContext) -> list[Violation]:
        """A call's arguments against the facts, before any byte of the call is sent."""
        try:
            args = json.loads(call.get("arguments") or "{}")
        except ValueError:
            return []
        out = []
        for ptr, value, _, _ in JsonPointerParser().feed(json.dumps(args)):
            v = self._judge(ptr, value, 0, 0, prefix="a tool call's argument ",
                            quote_prefix=f"tool {call.get('name')}: ")
            if v:
                out.append(v)
        return out

    def finish(self, final_text: str, context: CheckContext) -> list[Violation]:
        return [v for call in context.tool_calls for v in self.check_call(call, context)]
