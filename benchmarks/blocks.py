"""Where KV blocks go: engine.block_manager's runs against plain hand-out order (the next free
block, least recently freed first), which it replaced.

    python -m benchmarks.blocks                 # the simulation: consecutive steps, hit rate
    python -m benchmarks.blocks --engine 5      # and the default model's engine, 5 rounds each
    python -m benchmarks.blocks --engine 5 --streams 16 --prompt-tokens 1000 --kv-blocks 2912 --no-simulation

The simulation (`serve`) drives a BlockManager alone through decode steps of many concurrent
sequences until its pool has cycled several times, and counts how many of the live block
tables' steps go onto the next block in memory (what the CPU attention kernels read fastest,
kernels_bench --only placement) and the prefix cache's hit rate. The engine rounds are
--streams greedy requests of --prompt-tokens random tokens and 128 new tokens through the
offline LLM, the two policies in alternating rounds on one engine whose pool has been cycled
first.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from benchmarks.cpu import cpu_line
from engine.block_manager import BlockManager
from engine.sequence import Sequence
from engine.types import SamplingParams


def hand_out_order(self: BlockManager, table: list[int]) -> int:
    """The policy before runs: the next free block in hand-out order, wherever it lies."""
    return next(iter(self.free_ids))


def serve(num_blocks: int, live: int, steps: int, shared_prompts: list[list[int]],
          seed: int = 0) -> tuple[float, float]:
    """A server's blocks over `steps` decode steps of `live` concurrent sequences: prompts of
    40-200 random tokens, or one of shared_prompts and 10-80 tokens of their own, and then 30%
    of requests the next turn of one of the last 100 conversations; 64-300 generated tokens.
    Returns the prefix hit rate and the fraction of table steps onto the next block in memory
    over the second half of the steps."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, 16, prefix_caching=True)
    running: list[Sequence] = []
    done: list[list[int]] = []
    ends: dict[int, int] = {}
    counts = [0, 0]

    def admit() -> bool:
        if shared_prompts and done and rng.random() < 0.3:
            prompt = rng.choice(done[-100:]) + [rng.randrange(49000) for _ in range(30)]
        else:
            head = rng.choice(shared_prompts) if shared_prompts else []
            own = rng.randint(10, 80) if head else rng.randint(40, 200)
            prompt = head + [rng.randrange(49000) for _ in range(own)]
        s = Sequence("r", 0, prompt, len(prompt), SamplingParams(), seed=0)
        ends[s.seq_id] = len(prompt) + rng.randint(64, 300)
        found = bm.match(s, 0)
        new = s.num_tokens - len(found) * 16
        if not bm.can_allocate(bm.blocks_needed(s, new, found)):
            return False
        bm.allocate(s, new, found)
        s.num_computed_tokens = s.num_tokens
        bm.register(s, 0)
        running.append(s)
        return True

    for i in range(steps):
        while len(running) < live and admit():
            pass
        for s in list(running):
            if s.num_tokens >= ends[s.seq_id] or not bm.can_allocate(bm.blocks_needed(s, 1)):
                done.append(list(s.token_ids))
                bm.free(s)
                running.remove(s)
                continue
            bm.allocate(s, 1)
            s.token_ids.append(rng.randrange(49000))
            s.num_computed_tokens += 1
            bm.register(s, 0)
            if i >= steps // 2:
                t = s.block_table
                counts[0] += sum(t[j + 1] == t[j] + 1 for j in range(len(t) - 1))
                counts[1] += len(t) - 1
    assert bm.num_free_blocks + len(set().union(*(s.block_table for s in running))) == num_blocks
    return bm.num_hit_tokens / bm.num_queried_tokens, counts[0] / counts[1]


def shared_prompts(seed: int = 1) -> list[list[int]]:
    """Four system prompts of 64-160 tokens."""
    rng = random.Random(seed)
    return [[rng.randrange(49000) for _ in range(rng.randint(64, 160))] for _ in range(4)]


def simulate() -> None:
    runs = BlockManager._next_block
    print("| blocks | streams | load | hand-out order: consecutive, hit rate | runs: consecutive, hit rate |")
    print("|---|---|---|---|---|")
    for blocks, live in ((1600, 16), (2912, 16), (1600, 32), (2912, 32)):
        for load, prompts in (("random", []), ("chat", shared_prompts())):
            cells = []
            for policy in (hand_out_order, runs):
                BlockManager._next_block = policy       # type: ignore[method-assign]
                hit, consecutive = serve(blocks, live, 2500, prompts)
                cells.append(f"{consecutive:.2f}, {hit:.3f}" if prompts else f"{consecutive:.2f}, -")
            BlockManager._next_block = runs             # type: ignore[method-assign]
            print(f"| {blocks} | {live} | {load} | {cells[0]} | {cells[1]} |", flush=True)


def engine_rounds(rounds: int, streams: int, prompt_tokens: int, kv_blocks: int) -> None:
    from engine import LLM
    runs = BlockManager._next_block
    llm = LLM(**({"num_kv_blocks": kv_blocks} if kv_blocks else {}))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    tps: dict[str, list[float]] = {"hand-out order": [], "runs": []}
    for r in range(4 + 2 * rounds):             # 4 rounds to cycle the pool first
        name = "runs" if r < 4 or r % 2 else "hand-out order"
        BlockManager._next_block = runs if name == "runs" else hand_out_order  # type: ignore[method-assign]
        prompts = [[rng.randrange(1000, 40000) for _ in range(prompt_tokens)] for _ in range(streams)]
        start = time.perf_counter()
        llm.generate(prompts, params)
        if r >= 4:
            tps[name].append(streams * 128 / (time.perf_counter() - start))
    BlockManager._next_block = runs             # type: ignore[method-assign]
    ratios = [b / a for a, b in zip(tps["hand-out order"], tps["runs"])]
    print(f"engine, {streams} streams, {prompt_tokens}-token prompts, tokens/s (median of {rounds}): "
          + ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in tps.items())
          + f"; runs / hand-out order per round: {' '.join(f'{x:.2f}' for x in ratios)}, "
          f"median {statistics.median(ratios):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", type=int, default=0, metavar="ROUNDS",
                    help="also time the default model's engine, ROUNDS rounds per policy")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--kv-blocks", type=int, default=0, help="the engine's pool (0: LLM's default)")
    ap.add_argument("--no-simulation", dest="simulation", action="store_false")
    args = ap.parse_args()
    print(f"# KV block placement; {cpu_line()}")
    if args.simulation:
        simulate()
    if args.engine:
        engine_rounds(args.engine, args.streams, args.prompt_tokens, args.kv_blocks)


if __name__ == "__main__":
    main()
