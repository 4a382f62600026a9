"""A decode step's time depending on which thread runs it (why AsyncEngine has one compute thread).

    python -m benchmarks.step_threads [--seqs 32] [--repeats 10] [--profile]

Each thread that enters an OpenMP region gets its own team of workers. The script fills a batch
of decoding sequences, then times the same step on the main thread, on one worker thread, on
the main thread again, and on a pool of rotating threads. Prints medians in ms. --profile first
prints torch's profiler table (self CPU time per op) over 5 steps on the main thread.
"""
from __future__ import annotations

import argparse
import concurrent.futures

from benchmarks.engine_throughput import prompt_ids
from engine.config import EngineConfig
from engine.engine import EngineCore
from engine.types import GenerateRequest, SamplingParams
from kernels.linear import _median_ms    # the timing loop kernels_bench and calibrate use


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="where a step's time goes, by op")
    args = ap.parse_args()
    core = EngineCore(EngineConfig())
    params = SamplingParams(max_tokens=1024, temperature=0.0, ignore_eos=True)
    for i in range(args.seqs):
        core.add_request(GenerateRequest(f"s{i}", tuple(prompt_ids(core.tokenizer, 100, i)), params))
    while core.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                        for s in core.scheduler.running):
        core.step()                                  # prefill, so every timed step is a decode
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                core.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    one = concurrent.futures.ThreadPoolExecutor(1)
    rotating = concurrent.futures.ThreadPoolExecutor(4)
    runs = [("main thread", core.step),
            ("one worker thread", lambda: one.submit(core.step).result()),
            ("main thread again", core.step),
            ("rotating threads", lambda: rotating.submit(core.step).result())]
    for name, fn in runs:
        print(f"{name:<20} {_median_ms(fn, args.repeats):7.1f} ms per {args.seqs}-sequence decode step",
              flush=True)


if __name__ == "__main__":
    main()
