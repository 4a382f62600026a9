"""Arithmetic claims in text (`17 * 3 = 51`): where one may be, and whether it holds. The
arithmetic check (checks.py) finds them as text streams and recomputes each."""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

NUM = r"-?\d{1,20}(?:\.\d{1,12})?"
# Binary claims `a op b = c`. Not preceded by a word char, `.`, `-`, `/` or `=` (versions 1.2.3,
# dates 2024-01-05 or 1/2/2024, chains x=3-1=2) nor followed by one (`= 12.5.1`, `= 51st`). `x` as times only
# between spaces, so hex and dimensions like `3x4` stay out.
CLAIM = re.compile(
    rf"(?<![\w.\-/^=])({NUM})\s*([+\-*/×÷]|\s[x]\s)\s*({NUM})\s*=\s*({NUM})(?![\w\-/^]|\.\d|[*/+^])")
# The last character no claim can contain: a claim in the making starts after it.
NOT_CLAIM_TAIL = re.compile(r"[^\d\s.+\-*/×÷x=][\d\s.+\-*/×÷x=]*\Z")
MAX_CLAIM = 3 * 34 + 16   # longest claim the pattern can match, with some spacing


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


def claim_holds(a: str, op: str, b: str, c: str) -> bool | None:
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
