"""A decode step's time depending on which thread runs it (why AsyncEngine has one compute thread).

    python -m benchmarks.step_threads [--seqs 32] [--prompt-tokens 100] [--repeats 10] [--profile]
                                      [--ops] [--dtype D] [--ab MODULE.NAME=VALUE ...]

Each thread that enters an OpenMP region gets its own team of workers. The script fills a batch
of decoding sequences, then times the same step on the main thread, on one worker thread, on
the main thread again, and on a pool of rotating threads. Prints medians in ms. --profile first
prints torch's profiler table (self CPU time per op) over 5 steps on the main thread. --ops
first prints wall-clock ms per step in each of the model's calls (linear, attention, norm,
rotary + store, logits, sampling, input preparation), timed around the calls themselves: torch's
profiler does not see numba kernels and inflates small ops. --ab times `--repeats` pairs of decode
steps, one as the engine runs and one with the given module globals set (benchmarks.engine_ab's
--b-set, e.g. kernels.decode_cpu.WIDEN_ONCE=false), step by step in alternation: the whole step and
its attention calls, medians and the median of the pairs' ratios.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import statistics
import time
from typing import Any

from benchmarks.engine_throughput import prompt_ids
from engine.config import EngineConfig
from engine.engine import EngineCore
from engine.types import GenerateRequest, SamplingParams
from kernels.calibrate import median_ms    # the timing loop kernels_bench and calibrate use


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="where a step's time goes, by op")
    ap.add_argument("--ops", action="store_true", help="wall-clock ms per step in each model call")
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--ab", nargs="+", default=[], metavar="MODULE.NAME=VALUE",
                    help="step pairs: as the engine runs, and with these module globals set")
    args = ap.parse_args()
    from benchmarks.cpu import cpu_line
    print(f"cpu: {cpu_line()}", flush=True)
    core = EngineCore(EngineConfig(dtype=args.dtype, deterministic=args.deterministic))
    print(f"body dtype: {core.runner.dtype_name} ({core.runner.dtype_reason}); lm_head: "
          f"{core.runner.head_precision} ({core.runner.head_reason})", flush=True)
    params = SamplingParams(max_tokens=1024, temperature=0.0, ignore_eos=True)
    for i in range(args.seqs):
        ids = prompt_ids(core.tokenizer, args.prompt_tokens, i)
        core.add_request(GenerateRequest(f"s{i}", tuple(ids), params))
    while core.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                        for s in core.scheduler.running):
        core.step()                                  # prefill, so every timed step is a decode
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                core.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.ops:
        op_times(core, args.repeats)
    if args.ab:
        ab_steps(core, args.ab, args.repeats)
    one = concurrent.futures.ThreadPoolExecutor(1)
    rotating = concurrent.futures.ThreadPoolExecutor(4)
    runs = [("main thread", core.step),
            ("one worker thread", lambda: one.submit(core.step).result()),
            ("main thread again", core.step),
            ("rotating threads", lambda: rotating.submit(core.step).result())]
    for name, fn in runs:
        print(f"{name:<20} {median_ms(fn, args.repeats):7.1f} ms per {args.seqs}-sequence decode step",
              flush=True)


def _timed(spent: dict[str, float], name: str, fn: Any) -> Any:
    """fn, adding the seconds each call takes to spent[name]."""
    def call(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[name] += time.perf_counter() - start
    return call


def ab_steps(core: EngineCore, items: list[str], pairs: int) -> None:
    """`pairs` pairs of decode steps: as the engine runs (A), then with `items` set (B)."""
    from benchmarks.engine_ab import module_values
    model = core.runner.model
    attention, spent = model.attention, collections.defaultdict(float)

    def step(settings: list[str]) -> tuple[float, float]:
        spent.clear()
        with module_values(settings):
            start = time.perf_counter()
            core.step()
            return (time.perf_counter() - start) * 1e3, spent["attention"] * 1e3

    model.attention = _timed(spent, "attention", attention)
    try:
        step([]), step(items)                          # compile and warm both
        runs = [(step([]), step(items)) for _ in range(pairs)]
    finally:
        model.attention = attention
    print(f"A: as the engine runs   B: {' '.join(items)}; {pairs} pairs of decode steps, ms")
    for i, what in enumerate(("whole step", "attention")):
        a, b = [r[0][i] for r in runs], [r[1][i] for r in runs]
        ratio = statistics.median(x / y for x, y in zip(a, b))
        print(f"{what:<12} A {statistics.median(a):7.2f}   B {statistics.median(b):7.2f}   "
              f"A / B {ratio:.3f}", flush=True)


def op_times(core: EngineCore, steps: int, run: Any = None) -> None:
    """Time the model's calls by wrapping them (instance attributes and engine.model's names),
    call `run` (default: one engine step) once to warm up and `steps` times timed, print ms per
    call, then put everything back."""
    run = run or core.step
    import engine.model as model_module
    import engine.model_runner as runner_module
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(name: str, fn: Any) -> Any:
        return _timed(spent, name, fn)

    runner, model = core.runner, core.runner.model
    # set per instance in __init__ (deterministic mode swaps them)
    linear, attention, norm, mlp_in = model.linear, model.attention, model.rms_norm, model.gate_up_silu
    patches = [(model_module, "rotate_and_store")]
    patches.append((runner_module, "sample"))
    originals = [(obj, name, getattr(obj, name)) for obj, name in patches]
    for obj, name, fn in originals:
        setattr(obj, name, timed(name, fn))
    # the head is model.head_linear; gate_up is in gate_up_silu (with silu * up, fused or not)
    model.linear = timed("qkv, o, down", linear)
    model.attention = timed("attention", attention)
    model.rms_norm = timed("rms_norm", norm)
    model.gate_up_silu = timed("gate_up + silu * up", mlp_in)
    model.compute_logits = timed("logits", model.compute_logits)    # shadows the method
    runner.prepare = timed("prepare", runner.prepare)
    try:
        run()
        spent.clear()
        start = time.perf_counter()
        for _ in range(steps):
            run()
        spent["total"] = time.perf_counter() - start
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)
        model.linear, model.attention, model.rms_norm, model.gate_up_silu = (linear, attention, norm,
                                                                             mlp_in)
        del model.compute_logits, runner.prepare
    for name, total in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"{name:<22} {total / steps * 1e3:7.2f} ms", flush=True)


if __name__ == "__main__":
    main()
