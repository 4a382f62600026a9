"""Cost of flag-mode checks per token: realistic text fed in ~4-character increments.

    python -m benchmarks.checks_bench

Prints microseconds per token for prose (deny + arithmetic) and JSON (deny + schema +
consistency), and that as a share of a 30 ms/token decode step.
"""
from __future__ import annotations

import json
import time

from gateway.checks import CheckContext, merge_policy, server_policy
from gateway.consistency import AssertionBuffer
from gateway.guard import Guard

STEP_BUDGET_S = 0.030
PROSE = ("The invoice total is computed line by line. 17 * 3 = 51 units at 12.50 each, and "
         "12+5=17 items were returned on 2024-01-05 (see version 1.2.3 notes). Then 100 / 4 = 25 "
         "per box; nothing else changes. ") * 40
RECORD = {"customer_id": "AB-0001", "plan": "pro", "seats": 12, "email": "ops@example.com",
          "items": [{"sku": f"SKU-{i:04d}", "qty": i, "price": 9.5 + i} for i in range(40)]}
SCHEMA = {"type": "object", "properties": {"customer_id": {"type": "string"},
          "email": {"type": "string", "format": "email"}, "seats": {"type": "integer"},
          "items": {"type": "array", "items": {"type": "object"}}}}


def bench(text: str, guard_of, rounds: int = 20) -> tuple[float, int]:
    chunks = [text[i:i + 4] for i in range(0, len(text), 4)]   # ~4 characters per token
    best = float("inf")
    for _ in range(rounds):
        g = guard_of()
        t0 = time.perf_counter()
        for c in chunks:
            g.feed(c)
        g.finish("stop")
        best = min(best, time.perf_counter() - t0)
    return best / len(chunks), len(chunks)


def main() -> None:
    server = server_policy("flag", "unit", {"deny": [r"(?i)drop\s+table", r"sk-[A-Za-z0-9]{32}"]})
    prose = merge_policy(server, {"checks": {"arithmetic": True}})
    structured = merge_policy(server, {"checks": {"consistency": "detect"}})
    buf = AssertionBuffer()
    for key, value in (("/customer_id", "AB-0001"), ("/plan", "pro"), ("/seats", 12)):
        buf.add(key, value, "plumbline.assertions")
    cases = {
        "prose (deny+arithmetic+truncation)": (PROSE, lambda: Guard(prose, CheckContext())),
        "json (deny+schema+consistency+truncation)": (
            json.dumps(RECORD, indent=2) * 1,
            lambda: Guard(structured, CheckContext(schema=SCHEMA, is_structured=True, assertions=buf))),
    }
    for name, (text, make) in cases.items():
        per_token, n = bench(text, make)
        print(f"checks flag {name}: {n} tokens, {per_token * 1e6:.1f} us/token, "
              f"{100 * per_token / STEP_BUDGET_S:.3f}% of a 30 ms step")


if __name__ == "__main__":
    main()
