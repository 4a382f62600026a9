"""Cost of the checks.

    python -m benchmarks.checks_bench            # the checks alone, per token
    python -m benchmarks.checks_bench --server [--concurrency 32] [--new-tokens 128] [--rounds 3]

Alone: microseconds per token for prose (deny + arithmetic) and JSON (deny + schema +
consistency), text fed in ~4-character increments, in flag mode and in block mode (release
"stream"), and 32 tokens of that (one per stream) as a share of a 32-stream decode step of the
engine, measured in the same run (the default model, fp32, greedy).

--server: through the gateway on the real engine, in one process (the setup of
benchmarks/gateway_overhead.py): aggregate tokens/s at `--concurrency` streams with the guard
off and in flag mode (deny + arithmetic), alternating rounds, one summary line with the
medians and their ratio (target: flag keeps >= 97%); then block mode's latency to the first
released byte, one stream at a time, for release "unit" and "final" against the guard off.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from gateway.guard import AssertionBuffer, CheckContext, Guard, merge_policy, server_policy

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


def step_s_32(model: str) -> float:
    """Seconds of one decode step at 32 streams: (32 x 17 tokens - 32 x 1 token) / 16 steps."""
    from engine import LLM, SamplingParams
    llm = LLM(model, enable_prefix_caching=False)
    prompts = [[1 + i] + llm.tokenizer(PROSE[:400]).input_ids[:100] for i in range(32)]
    def run(n: int) -> float:
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        return time.perf_counter() - t0
    run(2)                                                  # warm
    return statistics.median((run(17) - run(1)) / 16 for _ in range(3))


def standalone(model: str) -> None:
    from benchmarks.cpu import cpu_line
    print(f"cpu: {cpu_line()}", flush=True)
    step = step_s_32(model)
    print(f"engine decode step at 32 streams: {step * 1e3:.1f} ms", flush=True)
    for mode, release in (("flag", "unit"), ("block", "stream")):
        _cases(mode, release, step)


def _cases(mode: str, release: str, step: float) -> None:
    server = server_policy(mode, release, {"deny": [r"(?i)drop\s{1,4}table", r"sk-[A-Za-z0-9]{32}"]})
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
        print(f"checks {mode} {name}: {n} tokens, {per_token * 1e6:.1f} us/token, "
              f"32 tokens = {100 * 32 * per_token / step:.2f}% of a 32-stream step", flush=True)


# -- through the server ---------------------------------------------------------------------

# Bounded patterns: a deny check holds back as many characters as its widest match, so an
# unbounded one (`\s+`) holds 256 and "unit" release then waits almost as long as "final".
DENY = [r"(?i)drop\s{1,4}table", r"sk-[A-Za-z0-9]{32}"]
GUARDS: dict[str, dict[str, Any]] = {
    "off": {"mode": "off"},
    "flag": {"mode": "flag", "checks": {"deny": DENY, "arithmetic": True}},
    "unit": {"mode": "block", "release": "unit", "checks": {"deny": DENY, "arithmetic": True}},
    "final": {"mode": "block", "release": "final", "checks": {"deny": DENY, "arithmetic": True}},
}
PROMPT = "Explain, in a few short sentences, how a bicycle gear works. "


def body(args: argparse.Namespace, prompt: Any, guard: str, new_tokens: int) -> bytes:
    return json.dumps({"model": args.model, "prompt": prompt, "max_tokens": new_tokens,
                       "temperature": 0.0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True},
                       "plumbline": {"guard": GUARDS[guard]}}).encode()


async def throughput_round(port: int, data: bytes, concurrency: int) -> float:
    from benchmarks.gateway_overhead import stream_one

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(stream_one(port, data) for _ in range(concurrency)))
    return sum(counts) / (time.perf_counter() - t0)


async def first_released_byte(port: int, data: bytes) -> float:
    """Seconds from sending the request to the first chunk carrying text; reads to the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                 b"content-type: application/json\r\nconnection: close\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(data), data))
    await writer.drain()
    first = None
    while line := await reader.readline():
        if first is None and line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0].get("text"):
                first = time.perf_counter() - t0
    writer.close()
    assert first is not None, "no text was released"
    return first


async def through_server(args: argparse.Namespace) -> None:
    from benchmarks.gateway_overhead import served_engine

    tps: dict[str, list[float]] = {"off": [], "flag": []}
    latency: dict[str, list[float]] = {"off": [], "unit": [], "final": []}
    async with served_engine(args.model, args.max_num_seqs) as (_, port):
        await throughput_round(port, body(args, PROMPT, "flag", 8), args.concurrency)   # warm-up
        for r in range(args.rounds):
            for guard in ("off", "flag"):
                tps[guard].append(await throughput_round(
                    port, body(args, PROMPT, guard, args.new_tokens), args.concurrency))
            print(f"round {r + 1}: off {tps['off'][-1]:.1f} tok/s, flag {tps['flag'][-1]:.1f} "
                  "tok/s", flush=True)
        for _ in range(args.latency_requests):
            for guard in latency:
                latency[guard].append(await first_released_byte(
                    port, body(args, PROMPT, guard, args.latency_tokens)))
    off, flag = statistics.median(tps["off"]), statistics.median(tps["flag"])
    print(f"checks_bench server concurrency={args.concurrency} new={args.new_tokens} "
          f"rounds={args.rounds}: off {off:.1f} tok/s, flag {flag:.1f} tok/s, "
          f"flag/off = {100 * flag / off:.1f}%")
    ms = {g: 1000 * statistics.median(v) for g, v in latency.items()}
    print(f"checks_bench block latency to first released byte (median of "
          f"{args.latency_requests}, {args.latency_tokens} tokens, one stream): "
          f"off {ms['off']:.0f} ms, unit {ms['unit']:.0f} ms, final {ms['final']:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", action="store_true", help="measure through the gateway")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--latency-requests", type=int, default=5)
    ap.add_argument("--latency-tokens", type=int, default=64)
    args = ap.parse_args()
    if args.server:
        asyncio.run(through_server(args))
    else:
        standalone(args.model)


if __name__ == "__main__":
    main()
