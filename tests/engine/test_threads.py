"""The compute thread's thread counts, checked in a fresh process: numba's pool starts once per
process and changes the OpenMP thread count of the thread that starts it (kernels/backend.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Builds an AsyncEngine, runs one request and prints what the compute thread sees afterwards.
SCRIPT = """
import asyncio, json, sys
import numba, torch
from engine import AsyncEngine, EngineConfig, GenerateRequest, SamplingParams

async def main():
    engine = AsyncEngine(EngineConfig(model=sys.argv[1], num_threads=1))
    await engine.start()
    try:
        ids = tuple(engine.tokenizer("hello").input_ids)
        stream = engine.add_request(GenerateRequest("r", ids, SamplingParams(max_tokens=3)))
        await stream.ready()
        [d async for d in stream]
        counts = await engine._in_compute_thread(
            lambda: {"torch": torch.get_num_threads(), "numba": numba.get_num_threads()})
    finally:
        await engine.shutdown()
    print(json.dumps(counts))

asyncio.run(main())
"""


def run_engine(tiny_model_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_num_threads_holds_on_the_compute_thread(tiny_model_dir):
    # Only meaningful where numba would start more than one thread.
    assert os.cpu_count() and os.cpu_count() > 1
    assert run_engine(tiny_model_dir) == {"torch": 1, "numba": 1}
