"""What deterministic mode costs: the default engine and a deterministic one in one process,
timed round by round in alternation, so that whatever else the machine does falls on both.

    python -m benchmarks.deterministic_cost [--concurrency 1 8 32] [--rounds 3] [--dtype float32]

Each round is N greedy requests of ~100 prompt tokens and --new-tokens new tokens (ignore_eos)
through the offline `LLM` wrapper (the same engine core the server drives). Reports generated
tokens/s per mode (median of the rounds) and the median of the per-round ratios, with the CPU
line: a figure holds only for the CPU it came from.
"""
from __future__ import annotations

import argparse
import statistics
import time

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
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    print(f"cpu: {cpu_line()}", flush=True)
    # No prefix cache in either: every round would otherwise reuse the last round's prompts.
    engines = {mode: LLM(dtype=args.dtype, deterministic=mode == "deterministic",
                         enable_prefix_caching=False, max_num_batched_tokens=512)
               for mode in ("default", "deterministic")}
    tok = engines["default"].tokenizer
    for mode, llm in engines.items():                       # compile and warm both
        tokens_per_s(llm, [prompt_ids(tok, 100, 0)], 4)
    print(f"{'streams':>7}  {'default tok/s':>13}  {'deterministic tok/s':>19}  {'ratio':>6}")
    for n in args.concurrency:
        prompts = [prompt_ids(tok, 100, i) for i in range(n)]
        rates: dict[str, list[float]] = {mode: [] for mode in engines}
        for _ in range(args.rounds):
            for mode, llm in engines.items():
                rates[mode].append(tokens_per_s(llm, prompts, args.new_tokens))
        ratio = statistics.median(d / b for d, b in zip(rates["deterministic"], rates["default"]))
        print(f"{n:>7}  {statistics.median(rates['default']):>13.1f}  "
              f"{statistics.median(rates['deterministic']):>19.1f}  {ratio:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
