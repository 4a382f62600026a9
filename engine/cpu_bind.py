"""Which cores the compute thread's OpenMP team is pinned to, and which the event loop keeps.

`--cpu-bind` (EngineConfig.cpu_bind):
- "none": nothing is pinned; the OS places every thread (the library's default).
- "auto" (the server's default): pin only where the team can have cores of its own and at
  least one allowed CPU is left over for the event loop: the team (num_threads, else torch's
  count) on the last physical cores (one logical CPU each, SMT siblings left out), the loop
  on every allowed CPU outside it. A team on every core stays unpinned: the loop, tokenizers
  and grammar compiles would share its cores, and a pinned member cannot move off a core they
  take (a barrier then waits for it): on 2 vCPUs a pinned team ran slower at 1 and 8
  streams and even at 32 (docs/BENCHMARKS.md). So is a Ray replica's: other replicas share
  the node.
- a CPU list ("2-5", "0,2,4"): the team on exactly these, one thread each, in that order, and
  the loop on the allowed CPUs outside them (if any).

The loop keeps the first CPUs: they tend to take the OS's housekeeping and interrupts.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True, slots=True)
class CpuBinding:
    team_cpus: tuple[int, ...]       # member i pinned to team_cpus[i]; () = nothing pinned
    # where the event loop (and threads off the team) go; () = left where they are. Never set
    # without a team: an unpinned team's cores are every core.
    loop_cpus: tuple[int, ...]
    reason: str


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6] (the kernel's cpuset list format, order kept)."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def physical_cores(cpus: list[int]) -> list[int]:
    """One logical CPU per physical core among cpus (the first of its SMT siblings)."""
    seen: set[str] = set()
    cores = []
    for cpu in sorted(cpus):
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
                            ).read_text().strip()
        except OSError:
            siblings = str(cpu)
        if siblings not in seen:
            seen.add(siblings)
            cores.append(cpu)
    return cores


def choose_binding(cpu_bind: str, num_threads: int) -> CpuBinding:
    """The binding for EngineConfig.cpu_bind and num_threads, with its reason."""
    allowed = sorted(os.sched_getaffinity(0))
    if cpu_bind == "none":
        return CpuBinding((), (), "asked for none")
    if cpu_bind != "auto":
        team = parse_cpu_list(cpu_bind)
        assert set(team) <= set(allowed), f"--cpu-bind {cpu_bind}: allowed CPUs are {allowed}"
        assert not num_threads or num_threads == len(team), (
            f"--cpu-bind {cpu_bind} pins {len(team)} threads but --num-threads is {num_threads}")
        loop = [c for c in allowed if c not in team]
        return CpuBinding(tuple(team), tuple(loop), "asked for" + (
            "" if loop else "; no CPU left for the event loop: it shares the team's"))
    if "ray" in sys.modules:
        # An engine replica: other replicas share the node's cores, and which are whose is not
        # known here; "last n cores" would put every replica on the same ones.
        return CpuBinding((), (), "not pinned: a Ray replica cannot tell its cores from the "
                                  "other replicas'; give each a --cpu-bind list to pin")
    cores = physical_cores(allowed)
    n = num_threads or torch.get_num_threads()
    if n >= len(allowed) or n > len(cores):
        return CpuBinding((), (), (
            f"not pinned: {n} compute thread(s) on {len(allowed)} allowed CPUs leave none for the "
            "event loop; set --num-threads below the core count (or --cpu-bind CPUS) to pin"))
    team = cores[len(cores) - n:]
    loop = [c for c in allowed if c not in team]
    return CpuBinding(tuple(team), tuple(loop),
                      f"{n} compute thread(s) on cores of their own, the event loop on the rest")


def wait_policy_warning() -> str | None:
    """Why OMP_WAIT_POLICY, if set as it is, slows the CPU engine; None where it does not.

    PASSIVE puts a team's threads to sleep at the end of every parallel region, and a decode
    step is hundreds of short regions with Python between them, so each one starts with a
    wake-up: the server ran at 0.69-0.70x the speed at 8 and 32 streams (docs/BENCHMARKS.md,
    the OpenMP wait policy). It is easily inherited from a shell set up for another program.
    """
    if os.environ.get("OMP_WAIT_POLICY", "").strip().lower() != "passive":
        return None
    return ("OMP_WAIT_POLICY=PASSIVE makes every parallel region of a step wake its threads: "
            "about 0.7x the speed on the CPU; unset it")
