"""Constrained against unconstrained decoding throughput, in one run on one engine.

    python -m benchmarks.grammar_throughput [--concurrency 32] [--new-tokens 128] [--runs 5]

N concurrent requests (about 100 prompt tokens, --new-tokens each, greedy, EOS ignored) run
unconstrained and then under a JSON schema whose array must hold at least 50 objects, so no
output can end before its budget; runs alternate between the two so that machine noise hits
both alike. Every constrained step fills N bitmask rows (llguidance), applies them in one batched
operation and runs budget-aware closing's scan, and tokens the grammar forces are fast-forwarded
(`--no-fast-forward` samples them), as the server does by default. Reports the median generated
tokens/s of each, their ratio (the grammar issue's target: >= 95%) and the share of forced tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

from engine import AsyncEngine, EngineConfig, GenerateRequest, SamplingParams
from grammars import GrammarSpec

from benchmarks.engine_throughput import fresh_prompt_ids

SCHEMA = {"type": "object", "properties": {"items": {
    "type": "array", "minItems": 50, "items": {
        "type": "object", "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}},
        "required": ["name", "qty"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False}


async def run(engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    """(generated tokens/s, tokens) for all prompts at once."""
    t0 = time.perf_counter()
    total = 0

    async def one(ids: list[int]) -> None:
        nonlocal total
        request = GenerateRequest(f"g-{random.random()}", tuple(ids), params)
        async for delta in engine.generate(request):
            total += len(delta.token_ids)

    await asyncio.gather(*(one(ids) for ids in prompts))
    return total / (time.perf_counter() - t0), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-fast-forward", dest="fast_forward", action="store_false",
                    help="sample every token, also those the grammar forces")
    args = ap.parse_args()

    engine = AsyncEngine(EngineConfig(dtype=args.dtype, max_num_batched_tokens=512,
                                      grammar_fast_forward=args.fast_forward))
    def fresh_prompts(n: int) -> list[list[int]]:
        return [fresh_prompt_ids(engine.tokenizer, 100) for _ in range(n)]
    free = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    constrained = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True,
                                 grammar=spec)
    rates: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    forced = [0, 0]         # forced tokens, constrained tokens (measured runs only)

    async def runs() -> None:
        await engine.start()
        engine.core.grammars.compile(spec)               # compile time is not decode time
        await run(engine, fresh_prompts(4), free)        # warm-up (thread pools, caches)
        await run(engine, fresh_prompts(4), constrained)
        for i in range(args.runs):
            for name, params in (("unconstrained", free), ("constrained", constrained)):
                before = engine.stats().num_forced_tokens
                rate, tokens = await run(engine, fresh_prompts(args.concurrency), params)
                if params is constrained:
                    forced[0] += engine.stats().num_forced_tokens - before
                    forced[1] += tokens
                assert tokens == args.concurrency * args.new_tokens, (name, tokens)
                rates[name].append(rate)
                print(f"run {i + 1} {name:13s}: {rate:7.1f} tok/s", flush=True)
        await engine.shutdown()

    asyncio.run(runs())
    free_rate = statistics.median(rates["unconstrained"])
    con_rate = statistics.median(rates["constrained"])
    print(f"SUMMARY concurrency={args.concurrency} new_tokens={args.new_tokens} runs={args.runs} "
          f"dtype={args.dtype} fast_forward={args.fast_forward} | forced "
          f"{forced[0] / max(1, forced[1]):.1%} of constrained tokens | unconstrained "
          f"{free_rate:.1f} tok/s | constrained {con_rate:.1f} "
          f"tok/s | constrained/unconstrained {con_rate / free_rate:.1%}")


if __name__ == "__main__":
    main()
