"""How fast N prompts that arrive together get their first token, by step budget (issue 21).

    python -m benchmarks.prefill [--seqs 32] [--prompt-tokens 100] [--budgets 512 2048]
                                 [--attention in-place sdpa] [--rounds 3] [--dtype auto] [--ops]

The offline engine gets N requests at once (prompts of ~100 tokens, each different, prefix cache
off so later rounds recompute them) and steps until every one has its first token; no new
tokens after that (max_tokens 1), so the round is prefill and the first sampling only. The step
budget (`max_num_batched_tokens`, the tokens one step computes) decides how many chunks the
prompts take. Printed per budget: the round's wall time (every first token), TTFT p50 (the
median request's first token; each step's end stands for its tokens' arrival), prefill
tokens/s, steps; medians over rounds run budget by budget in alternation. --attention sdpa
also runs every budget with each prefill through torch's SDPA, one call per prompt and layer
(what the engine ran before kernels.prefill_cpu), alternating with the in-place kernel. --ops
adds ms per round in each of the model's calls (benchmarks.step_threads.op_times). What a server adds
(HTTP, SSE, the event loop) is not in these figures: benchmarks.peers measures TTFT as a client
sees it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import kernels.attention
from benchmarks.cpu import cpu_line
from benchmarks.engine_throughput import prompt_ids
from engine.config import DEFAULT_MODEL, EngineConfig
from engine.engine import EngineCore
from engine.types import GenerateRequest, SamplingParams


def one_round(core: EngineCore, budget: int, seqs: int, prompt_tokens: int, salt: int
              ) -> tuple[float, float, int]:
    """(wall s until every first token, median first-token s, steps) of one round."""
    core.scheduler.max_num_batched_tokens = budget
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i in range(seqs):
        ids = prompt_ids(core.tokenizer, prompt_tokens, salt * 1000 + i)
        core.add_request(GenerateRequest(f"r{salt}-{i}", tuple(ids), params))
    firsts: list[float] = []
    steps = 0
    start = time.perf_counter()
    while core.scheduler.has_work():
        deltas = core.step()
        steps += 1
        now = time.perf_counter() - start
        firsts += [now for d in deltas if d.token_ids]
    assert len(firsts) == seqs, f"{len(firsts)} of {seqs} requests got a token"
    return time.perf_counter() - start, statistics.median(firsts), steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--attention", nargs="+", default=["in-place"], choices=["in-place", "sdpa"],
                    help="the prefills' attention: the in-place kernel, SDPA per prompt, or both")
    ap.add_argument("--ops", action="store_true", help="ms per round in each model call")
    args = ap.parse_args(argv)
    print(f"cpu: {cpu_line()}", flush=True)
    core = EngineCore(EngineConfig(model=args.model, dtype=args.dtype, enable_prefix_caching=False,
                                   max_num_batched_tokens=max(args.budgets)))
    print(f"body dtype: {core.runner.dtype_name} ({core.runner.dtype_reason}); "
          f"{args.seqs} prompts of {args.prompt_tokens} tokens", flush=True)
    one_round(core, max(args.budgets), args.seqs, args.prompt_tokens, salt=999)    # warm-up
    cases = [(b, a) for b in args.budgets for a in args.attention]
    results: dict[tuple[int, str], list[tuple[float, float, int]]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for budget, attention in cases:
            kernels.attention.PREFILL_IN_PLACE = attention == "in-place"
            results[budget, attention].append(
                one_round(core, budget, args.seqs, args.prompt_tokens, r))
    total = args.seqs * args.prompt_tokens
    print("\n| step budget (tokens) | prefill attention | steps | all first tokens s | TTFT p50 s "
          "| prefill tokens/s |")
    print("|---|---|---|---|---|---|")
    for (budget, attention), runs in results.items():
        wall = statistics.median(w for w, _, _ in runs)
        p50 = statistics.median(t for _, t, _ in runs)
        print(f"| {budget} | {attention} | {runs[0][2]} | {wall:.3f} | {p50:.3f} "
              f"| {total / wall:.0f} |", flush=True)
    if args.ops:
        from benchmarks.step_threads import op_times
        for budget, attention in cases:
            print(f"\nbudget {budget}, {attention}: ms per round in each call")
            kernels.attention.PREFILL_IN_PLACE = attention == "in-place"
            op_times(core, 1, lambda b=budget: one_round(core, b, args.seqs, args.prompt_tokens, 7))
    kernels.attention.PREFILL_IN_PLACE = True


if __name__ == "__main__":
    main()
