"""The compute thread's threads, checked in a fresh process each: numba's pool starts once per
process and changes the OpenMP thread count of the thread that starts it (kernels/backend.py),
and pinning (engine/cpu_bind.py) moves threads for the rest of the process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Builds an AsyncEngine with the EngineConfig fields in argv[2] (JSON), runs one request, then
# prints what each thread of the process looks like: its affinity, and how much CPU time it
# spent while the compute thread multiplied two large matrices (torch's GEMM on its team).
SCRIPT = """
import asyncio, json, os, sys, threading
import numba, torch
from engine import AsyncEngine, EngineConfig, GenerateRequest, SamplingParams

def cpu_ticks():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        out[tid] = int(fields[11]) + int(fields[12])        # utime + stime
    return out

def on_compute_thread():
    before = cpu_ticks()
    a = torch.ones(1000, 1000)
    for _ in range(10):
        a @ a
    after = cpu_ticks()
    return {"torch": torch.get_num_threads(), "numba": numba.get_num_threads(),
            "compute_tid": threading.get_native_id(),
            "busy": [int(t) for t in after if after[t] - before.get(t, 0) >= 2]}

async def main():
    engine = AsyncEngine(EngineConfig(model=sys.argv[1], **json.loads(sys.argv[2])))
    await engine.start()
    try:
        ids = tuple(engine.tokenizer("hello").input_ids)
        stream = engine.add_request(GenerateRequest("r", ids, SamplingParams(max_tokens=3)))
        await stream.ready()
        [d async for d in stream]
        report = await engine._in_compute_thread(on_compute_thread)
    finally:
        await engine.shutdown()
    report["loop_tid"] = threading.get_native_id()
    report["affinity"] = {int(t): sorted(os.sched_getaffinity(int(t)))
                          for t in os.listdir("/proc/self/task")}
    print(json.dumps(report))

asyncio.run(main())
"""


def run_engine(tiny_model_dir: Path, **config) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), json.dumps(config)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["affinity"] = {int(t): cpus for t, cpus in report["affinity"].items()}
    return report


needs_2_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                  reason="needs 2 allowed CPUs (numba starts one thread per CPU)")


@needs_2_cpus
def test_num_threads_holds_on_the_compute_thread(tiny_model_dir):
    report = run_engine(tiny_model_dir, num_threads=1)
    assert (report["torch"], report["numba"]) == (1, 1)
    assert report["busy"] == [report["compute_tid"]]          # the GEMM ran on one thread


@needs_2_cpus
def test_a_cpu_list_pins_each_team_member_to_its_own_cpu(tiny_model_dir):
    team = sorted(os.sched_getaffinity(0))[:2]
    report = run_engine(tiny_model_dir, cpu_bind=",".join(map(str, team)))
    assert (report["torch"], report["numba"]) == (2, 2)
    affinity = report["affinity"]
    assert affinity[report["compute_tid"]] == [team[0]]       # member 0: the compute thread
    # The threads that ran torch's GEMM are the team: each on one CPU of its own, in the list.
    busy = report["busy"]
    assert len(busy) == 2 and report["compute_tid"] in busy
    assert sorted(affinity[tid][0] for tid in busy) == team
    assert all(len(affinity[tid]) == 1 for tid in busy)


@needs_2_cpus
def test_auto_pins_the_team_and_keeps_the_loop_off_its_cores(tiny_model_dir):
    allowed = sorted(os.sched_getaffinity(0))
    report = run_engine(tiny_model_dir, num_threads=1, cpu_bind="auto")
    affinity = report["affinity"]
    assert affinity[report["compute_tid"]] == [allowed[-1]]
    assert affinity[report["loop_tid"]] == allowed[:-1]


@needs_2_cpus
def test_auto_leaves_a_team_on_every_core_unpinned(tiny_model_dir):
    allowed = sorted(os.sched_getaffinity(0))
    report = run_engine(tiny_model_dir, num_threads=len(allowed), cpu_bind="auto")
    assert report["affinity"][report["compute_tid"]] == allowed
    assert report["affinity"][report["loop_tid"]] == allowed


def test_an_engine_dropped_is_freed_with_its_threads(tiny_model_dir):
    # The mask pool's worker thread lives as long as its pool; had it held the runner (a bound
    # method as its initializer), every engine built in a process would stay in memory.
    import gc
    import weakref

    from engine import LLM, SamplingParams
    from grammars import GrammarSpec

    llm = LLM(str(tiny_model_dir), cpu_bind="none")
    out = llm.generate(["Answer:"], SamplingParams(max_tokens=4, grammar=GrammarSpec(
        "regex", "(yes|no)")))          # a grammar: the mask pool's thread starts
    assert out[0].outputs[0].text in ("yes", "no")
    runner = weakref.ref(llm.core.runner)
    del llm
    gc.collect()
    assert runner() is None


def test_a_passive_omp_wait_policy_is_warned_of_at_start(tiny_model_dir, monkeypatch):
    from structlog.testing import capture_logs

    from engine import LLM
    from engine.cpu_bind import wait_policy_warning
    for value, warned in (("PASSIVE", True), (" passive ", True), ("ACTIVE", False), ("", False)):
        monkeypatch.setenv("OMP_WAIT_POLICY", value)
        assert (wait_policy_warning() is not None) == warned
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert wait_policy_warning() is None
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    with capture_logs() as logs:
        LLM(str(tiny_model_dir))
    assert [e["problem"] for e in logs if e["event"] == "omp_wait_policy"] == [wait_policy_warning()]
