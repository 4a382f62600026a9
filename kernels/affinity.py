"""Pinning the calling thread's OpenMP team, one core per thread.

torch's parallel regions and numba's run on one libgomp team per calling thread (numba binds to
torch's libgomp: kernels.backend.start_numba): the calling thread is member 0, and the pool's
workers 1..n-1 are the same threads in every region it starts. So one region of n iterations,
one per member, in which each member calls sched_setaffinity on itself pins the team for good,
as vLLM's init_cpu_threads_env does with `omp parallel for schedule(static, 1)`. Here the region
is numba's: with n iterations on n threads its static schedule gives iteration i to member i.
Each member reports its thread id, so the caller can check that every member took exactly one.
Threads the calling thread creates afterwards inherit its one core.
"""
from __future__ import annotations

import ctypes

import numba
import numpy as np
import torch
from numba import njit, prange

from kernels.backend import numba_threads, start_numba

_libc = ctypes.CDLL(None, use_errno=True)
# The mask goes in as an address (size_t): numba passes integers to ctypes functions, not
# pointers, and on x86-64 and aarch64 both travel in the same 64-bit register.
_setaffinity = _libc.sched_setaffinity
_setaffinity.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t]
_setaffinity.restype = ctypes.c_int
_gettid = _libc.gettid                   # glibc >= 2.30
_gettid.argtypes = []
_gettid.restype = ctypes.c_int

_MASK_WORDS = 16                         # 1024 CPUs, glibc's cpu_set_t


@njit(parallel=True)
def _pin_members(masks, tids, rcs):  # type: ignore[no-untyped-def]
    # masks [n, _MASK_WORDS] uint64: row i is member i's cpu_set_t; pid 0: the calling thread.
    for i in prange(masks.shape[0]):
        rcs[i] = _setaffinity(0, masks.shape[1] * 8, masks[i].ctypes.data)
        tids[i] = _gettid()


def pin_team(cpus: list[int]) -> list[int]:
    """Give the calling thread an OpenMP team of len(cpus) threads (torch's and numba's), member
    i pinned to cpus[i]; returns the members' thread ids in that order."""
    n = len(cpus)
    assert n == len(set(cpus)) >= 1, f"cpus must be distinct: {cpus}"
    start_numba()
    assert n <= numba.config.NUMBA_NUM_THREADS, (
        f"{n} pinned threads, but numba started only {numba.config.NUMBA_NUM_THREADS} "
        "(NUMBA_NUM_THREADS)")
    torch.set_num_threads(n)
    numba_threads()                      # numba's count follows torch's on this thread
    masks = np.zeros((n, _MASK_WORDS), dtype=np.uint64)
    for i, cpu in enumerate(cpus):
        masks[i, cpu // 64] = np.uint64(1) << np.uint64(cpu % 64)
    tids = np.zeros(n, dtype=np.int32)
    rcs = np.zeros(n, dtype=np.int32)
    _pin_members(masks, tids, rcs)
    assert not rcs.any(), f"sched_setaffinity failed for cpus {cpus}: {rcs.tolist()}"
    assert len(set(tids.tolist())) == n, f"the team's members took uneven shares: {tids.tolist()}"
    return tids.tolist()
