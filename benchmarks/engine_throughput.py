"""Engine throughput against transformers `generate`, in one run on one machine.

    python -m benchmarks.engine_throughput [--concurrency 1 8 32 64] [--dtype float32] [--runs 3]

Reports aggregate generated tokens/s for N concurrent requests (about 100 prompt tokens, 128 new
tokens each) and for a mixed workload (prompts of 20-200 tokens, max_tokens 16-256, arriving over
time) against transformers run sequentially and as padded static batches. Prints one summary line
at the end. Figures are medians of --runs runs.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import multiprocessing
import random
import statistics
import time

import torch

from benchmarks.cpu import cpu_line
from engine import AsyncEngine, EngineConfig, GenerateRequest, SamplingParams
from engine.config import DEFAULT_MODEL

FILLER = ("The history of computing is a story of abstractions layered one on another, from "
          "switches and vacuum tubes to transistors, compilers, operating systems and networks. ")


def prompt_ids(tok, num_tokens: int, salt: int) -> list[int]:
    ids = tok(f"Request {salt}. " + FILLER * (num_tokens // 20 + 2)).input_ids
    return ids[:num_tokens]


_fresh_salts = itertools.count(10_000)


def fresh_prompt_ids(tok, num_tokens: int) -> list[int]:
    """A prompt no earlier call in this process made: one the engine has not seen (a repeated
    prompt would skip its prefill through the prefix cache)."""
    return prompt_ids(tok, num_tokens, next(_fresh_salts))


async def run_engine(engine: AsyncEngine, requests: list[tuple[list[int], int, float]]) -> float:
    """requests: (prompt ids, max_tokens, arrival offset s) -> generated tokens/s."""
    t0 = time.perf_counter()
    total = 0

    async def one(i: int, ids: list[int], max_tokens: int, at: float) -> None:
        nonlocal total
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for delta in engine.generate(GenerateRequest(f"b{i}-{random.random()}", tuple(ids), params)):
            total += len(delta.token_ids)

    await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))
    return total / (time.perf_counter() - t0)


@torch.inference_mode()
def run_hf_static(model, tok, requests: list[tuple[list[int], int, float]], batch_size: int) -> float:
    """Padded static batches in arrival order; each batch runs to its longest max_tokens."""
    t0 = time.perf_counter()
    total = 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        # A static batch can only start once its last request has arrived.
        wait = max(at for _, _, at in chunk) - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)
        width = max(len(ids) for ids, _, _ in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _, _ in chunk])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in chunk])
        new = max(m for _, m, _ in chunk)
        model.generate(input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=pad)
        total += sum(m for _, m, _ in chunk)   # only the tokens the requests asked for count
    return total / (time.perf_counter() - t0)


def median(fn, runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def run_hf(model_dir: str, dtype: str, new_tokens: int, runs: int,
           mixed: list[tuple[list[int], int, float]]) -> dict[str, float]:
    """transformers sequentially, as a static batch of 32, and on the mixed workload."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    results = {}
    one = [(prompt_ids(tok, 100, 0), new_tokens, 0.0)]
    results["hf sequential"] = median(lambda: run_hf_static(model, tok, one, 1), runs)
    print(f"transformers sequential   : {results['hf sequential']:8.1f} tok/s", flush=True)
    b32 = [(prompt_ids(tok, 100, i), new_tokens, 0.0) for i in range(32)]
    results["hf static 32"] = median(lambda: run_hf_static(model, tok, b32, 32), runs)
    print(f"transformers static b=32  : {results['hf static 32']:8.1f} tok/s", flush=True)
    if mixed:
        results["hf mixed static"] = median(lambda: run_hf_static(model, tok, mixed, 32), runs)
        print(f"transformers mixed static : {results['hf mixed static']:8.1f} tok/s", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--mixed-requests", type=int, default=48)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--deterministic", action="store_true", help="batch-invariant mode")
    args = ap.parse_args(argv)
    print(f"cpu: {cpu_line()}", flush=True)

    engine = AsyncEngine(EngineConfig(model=args.model, dtype=args.dtype, max_num_batched_tokens=512,
                                      deterministic=args.deterministic))
    tok = engine.tokenizer
    results: dict[str, float] = {}

    async def engine_runs() -> None:
        await engine.start()
        for c in args.concurrency:
            rates = []
            for _ in range(args.runs):
                reqs = [(fresh_prompt_ids(tok, 100), args.new_tokens, 0.0) for _ in range(c)]
                rates.append(await run_engine(engine, reqs))
            results[f"plumbline c={c}"] = statistics.median(rates)
            print(f"plumbline  concurrency {c:3d}: {results[f'plumbline c={c}']:8.1f} tok/s", flush=True)
        if mixed:
            rates = []
            for _ in range(args.runs):       # the mixed workload's lengths, fresh prompts
                fresh = [(fresh_prompt_ids(tok, len(ids)), m, at) for ids, m, at in mixed]
                rates.append(await run_engine(engine, fresh))
            results["plumbline mixed"] = statistics.median(rates)
            print(f"plumbline  mixed workload : {results['plumbline mixed']:8.1f} tok/s", flush=True)
        print(f"prefix cache hits: {engine.stats().num_prefix_hit_tokens} tokens", flush=True)
        await engine.shutdown()

    rng = random.Random(0)
    arrivals = 0.0
    mixed = []
    for i in range(args.mixed_requests):
        arrivals += rng.expovariate(8.0)           # ~8 requests/s on average
        mixed.append((prompt_ids(tok, rng.randint(20, 200), 1000 + i), rng.randint(16, 256), arrivals))
    asyncio.run(engine_runs())

    if not args.skip_hf:
        # In a fresh process: a second thread running OpenMP work in this one (the engine ran on
        # its compute thread) would slow transformers down, not measure it.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            results.update(pool.submit(run_hf, str(engine.core.model_dir),
                                       engine.core.runner.dtype_name, args.new_tokens,
                                       args.runs, mixed).result())

    line = " | ".join(f"{k}: {v:.1f}" for k, v in results.items())
    if "hf sequential" in results and "plumbline c=32" in results:
        line += f" | c=32 vs hf sequential: {results['plumbline c=32'] / results['hf sequential']:.1f}x"
    if "hf mixed static" in results:
        line += f" | mixed vs hf static: {results['plumbline mixed'] / results['hf mixed static']:.2f}x"
    print(f"SUMMARY dtype={args.dtype} deterministic={args.deterministic} runs={args.runs} | {line}")


if __name__ == "__main__":
    main()
