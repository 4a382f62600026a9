"""Two engine settings side by side: the default engine (A) and one with EngineConfig fields
changed (B, `--b KEY=VALUE ...`; default: deterministic mode), in one process, timed round by
round in alternation, so that whatever else the machine does falls on both.

    python -m benchmarks.engine_ab [--concurrency 1 8 32] [--rounds 3] [--b deterministic=true]
    python -m benchmarks.engine_ab --b dtype=bfloat16          # the bf16 body against fp32
    python -m benchmarks.engine_ab --a dtype=bfloat16 --b dtype=bfloat16 cpu_bind=0,1
    python -m benchmarks.engine_ab --a dtype=bfloat16 --a-env PLUMBLINE_DOT_BF16=0 --b dtype=bfloat16
    python -m benchmarks.engine_ab --a dtype=bfloat16 --a-set kernels.decode_cpu.WIDEN_ONCE=false \
        --b dtype=bfloat16 --prompt-tokens 1000

`--a-env` / `--b-env` set environment variables while that engine is built (the kernels read
theirs when the weights are prepared, kernels/backend.py), and restore them after. `--a-set` /
`--b-set` set module globals that the kernels read at every call (kernels.decode_cpu.WIDEN_ONCE,
kernels.attention.PREFILL_IN_PLACE) around each of that engine's rounds.

Each engine is built and driven on a thread of its own, as the server drives its compute thread:
each thread that enters an OpenMP region has its own team of workers, so a setting that acts on
the team (cpu_bind pins it) stays with its engine. The idle engine's team sleeps while the other
runs (whole rounds in turn, not steps).

Each round is N greedy requests of --prompt-tokens (~100) and --new-tokens new tokens (ignore_eos)
through the offline `LLM` wrapper (the same engine core the server drives). Reports generated
tokens/s per mode (median of the rounds) and the median of the per-round ratios, with the CPU
line: a figure holds only for the CPU it came from.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import os
import statistics
import time
from collections.abc import Iterator

from benchmarks.cpu import cpu_line
from benchmarks.engine_throughput import prompt_ids
from engine import LLM, SamplingParams


def tokens_per_s(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--a", nargs="*", default=[], metavar="KEY=VALUE",
                    help="EngineConfig fields of engine A (default: the default fp32 engine)")
    ap.add_argument("--b", nargs="+", default=["deterministic=true"], metavar="KEY=VALUE",
                    help="EngineConfig fields of engine B")
    ap.add_argument("--a-env", nargs="*", default=[], metavar="NAME=VALUE",
                    help="environment variables set while engine A is built")
    ap.add_argument("--b-env", nargs="*", default=[], metavar="NAME=VALUE",
                    help="environment variables set while engine B is built")
    ap.add_argument("--a-set", nargs="*", default=[], metavar="MODULE.NAME=VALUE",
                    help="module globals set around each of engine A's rounds")
    ap.add_argument("--b-set", nargs="*", default=[], metavar="MODULE.NAME=VALUE",
                    help="module globals set around each of engine B's rounds")
    args = ap.parse_args()
    print(f"cpu: {cpu_line()}", flush=True)
    # No prefix cache in either: every round would otherwise reuse the last round's prompts.
    common = {"enable_prefix_caching": False, "max_num_batched_tokens": 512}
    fields = {"A": dict(_field(item) for item in args.a), "B": dict(_field(item) for item in args.b)}
    threads = {name: concurrent.futures.ThreadPoolExecutor(1) for name in fields}
    env = {"A": dict(item.split("=", 1) for item in args.a_env),
           "B": dict(item.split("=", 1) for item in args.b_env)}
    engines = {}
    for name in fields:
        with _environment(env[name]):
            engines[name] = threads[name].submit(LLM, **{**common, **fields[name]}).result()
    tok = engines["A"].tokenizer

    sets = {"A": args.a_set, "B": args.b_set}

    def rate(name: str, prompts: list[list[int]], new_tokens: int) -> float:
        with module_values(sets[name]):     # the other engine's thread waits meanwhile
            return threads[name].submit(tokens_per_s, engines[name], prompts, new_tokens).result()

    for name in engines:                                    # compile and warm both
        rate(name, [prompt_ids(tok, 100, 0)], 4)
    print(f"A: {' '.join(args.a + args.a_env + args.a_set) or 'default (fp32)'}   "
          f"B: {' '.join(args.b + args.b_env + args.b_set)}; {args.prompt_tokens} prompt tokens, "
          f"{args.new_tokens} new")
    print(f"{'streams':>7}  {'A tok/s':>9}  {'B tok/s':>9}  {'B / A':>6}")
    for n in args.concurrency:
        prompts = [prompt_ids(tok, args.prompt_tokens, i) for i in range(n)]
        rates: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name in engines:
                rates[name].append(rate(name, prompts, args.new_tokens))
        ratio = statistics.median(b / a for a, b in zip(rates["A"], rates["B"]))
        print(f"{n:>7}  {statistics.median(rates['A']):>9.1f}  "
              f"{statistics.median(rates['B']):>9.1f}  {ratio:>6.2f}", flush=True)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _field(item: str) -> tuple[str, object]:
    """KEY=VALUE -> an EngineConfig field: true/false as booleans, digits as ints."""
    key, _, value = item.partition("=")
    if value in ("true", "false"):
        return key, value == "true"
    return key, int(value) if value.isdigit() else value


@contextlib.contextmanager
def module_values(items: list[str]) -> Iterator[None]:
    """MODULE.NAME=VALUE ... (values as _field reads them): each module global set, and put back
    after. A name the module lacks is an error, not a new global nobody reads."""
    before = []
    try:
        for item in items:
            path, value = _field(item)
            module_name, _, name = path.rpartition(".")
            module = importlib.import_module(module_name)
            if not hasattr(module, name):
                raise SystemExit(f"engine_ab: {module_name} has no {name}")
            before.append((module, name, getattr(module, name)))
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in reversed(before):
            setattr(module, name, value)


if __name__ == "__main__":
    main()
