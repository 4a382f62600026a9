"""Which implementation a kernel call runs, and Triton kernels that can run interpreted.

The one place in `kernels/` that reads environment variables:
- PLUMBLINE_KERNELS=triton together with TRITON_INTERPRET=1 sends CPU tensors through the
  Triton kernels (run by Triton's interpreter); anything else keeps the fast CPU paths.
- CUDA tensors always take the Triton kernels.
- PLUMBLINE_KERNELS=torch keeps linear layers on plain `F.linear` (no packing), and
  PLUMBLINE_KERNELS=onednn on oneDNN's prepacked weights instead of our panel GEMM, for A/B runs
  against the fast path.
- PLUMBLINE_DOT_BF16=0 keeps bf16 layers' small products on the fp32 panel GEMM where the CPU
  has AVX512-BF16's dot product (kernels.dot_bf16), for A/B runs; read when a layer is prepared.

Triton is imported lazily: a CPU-only process never reaches a Triton kernel, so it never pays
for the import. Kernel modules name `triton` and `tl` through `LazyModule`s from here, and a
kernel's first launch puts the real modules in its globals (Triton's compiler and interpreter
accept only real modules there).

Triton decides between compiling and interpreting when `@triton.jit` decorates a function, that
is at import. `jit` below defers that choice to each launch, so one process (a pytest run) can
import the kernels once and still interpret them in the tests that set TRITON_INTERPRET=1.
Triton's own helpers (`tl.cdiv`, `tl.max`, `tl.sum`, ...) were decorated at import too, as
compiled functions that refuse to be called from Python; `_interpreting_helpers` lets the
interpreter call them for the duration of an interpreted launch.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import types
from typing import Any, Callable, Iterator

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> list[str]:
    """The CPU's native bf16 matrix instructions (AMX, AVX512-BF16); [] where it has none."""
    return sorted({"amx_bf16", "avx512_bf16"} & cpu_flags())


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def use_triton(t: torch.Tensor) -> bool:
    """Whether a call on tensor `t` should take the Triton kernel."""
    if t.is_cuda:
        return True
    return os.environ.get("PLUMBLINE_KERNELS", "").lower() == "triton" and interpreting()


def prepack_linear() -> bool:
    """Whether CPU fp32 linear layers run through oneDNN on prepacked weights (kernels.linear)."""
    return (os.environ.get("PLUMBLINE_KERNELS", "").lower() != "torch"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def panel_linear() -> bool:
    """Whether CPU fp32 linear layers run through our numba panel GEMM (kernels.linear)."""
    return os.environ.get("PLUMBLINE_KERNELS", "").lower() not in ("torch", "onednn")


def dot_bf16_linear() -> bool:
    """Whether bf16 layers keep their panels for kernels.dot_bf16: panels are on, the CPU has
    AVX512-BF16 and AVX512-VL, and numba compiles for a target that has them (LLVM cannot emit
    the instruction otherwise)."""
    return (panel_linear() and os.environ.get("PLUMBLINE_DOT_BF16", "1") != "0"
            and _dot_bf16_cpu())


@functools.cache
def _dot_bf16_cpu() -> bool:
    if not {"avx512_bf16", "avx512vl"} <= cpu_flags():
        return False
    import numba
    from llvmlite import binding
    if numba.config.CPU_NAME not in (None, "host"):
        return False        # an explicit target (NUMBA_CPU_NAME): it may lack the instruction
    features = binding.get_host_cpu_features()
    return bool(features.get("avx512bf16")) and bool(features.get("avx512vl"))


@functools.cache
def wide_registers() -> bool:
    """Whether numba's target keeps a 16-float vector (kernels.simd's float32x16) in one 512-bit
    register. Decided on the code LLVM emits, not on the CPU's flags: the target is numba's
    (NUMBA_CPU_NAME/FEATURES may name another than the host), and whether LLVM uses 512-bit
    registers for a target is its own choice. A one-line probe is compiled (not cached: its
    machine code is what is read, about 0.3 s once per process) and searched for a zmm register."""
    import numba
    import numpy as np
    from kernels import simd

    w = simd.WIDE

    def probe(a):  # type: ignore[no-untyped-def]
        simd.store16(a, 0, simd.fma16(simd.load16(a, 0), simd.load16(a, w), simd.load16(a, 2 * w)))
    compiled = numba.njit(probe)
    compiled(np.zeros(3 * w, np.float32))
    return any("zmm" in code for code in compiled.inspect_asm().values())


_numba_set = threading.local()      # the thread count this thread last gave numba
_numba_lock = threading.Lock()
_numba_started = False


def start_numba() -> None:
    """Start numba's thread pool (once per process) without changing torch's thread count.

    numba's OpenMP layer calls into torch's libgomp: torch loads its copy first and globally,
    so numba's calls bind to it, although numba also maps the system libgomp (LD_DEBUG=bindings).
    Starting the pool calls omp_set_num_threads(NUMBA_NUM_THREADS, the core count) on the thread
    that starts it, which is torch's thread count on that thread too: `--num-threads 1` became
    every core for all GEMMs of the compute thread (tests/engine/test_threads.py). So the pool is
    started here, on purpose, and the thread's count put back. (numba.set_num_threads only sets
    numba's own per-thread mask; it leaves OpenMP's count alone.)"""
    global _numba_started
    with _numba_lock:
        if _numba_started:
            return
        import numba
        torch_threads = torch.get_num_threads()
        numba.get_num_threads()                  # starts the pool
        torch.set_num_threads(torch_threads)
        _numba_started = True


# From this many rows a per-row numba kernel splits its rows across the threads (each row
# computed as alone: the same bits); below, a decode step's few rows are too little work to pay
# for a parallel launch. RMSNorm and rotary + KV store, bf16, each call right after a GEMM as in
# a step (Zen 4, 2 threads): at 32 rows split 45 / 55 us against 54 / 69 us serial, at 8-16
# rows no gain.
PARALLEL_ROWS = 32


def split_rows(serial: Callable[..., None], parallel: Callable[..., None], rows: int,
               *args: Any) -> None:
    """Run a per-row kernel over rows [0, rows): `serial(*args, 0, rows)` below PARALLEL_ROWS,
    else `parallel(*args, threads)`, its numba driver that splits the rows into one range per
    thread. (One generic driver taking the kernel as an argument runs, but numba then writes a
    new on-disk cache entry at every start instead of reusing one, so each kernel has its own.)"""
    if rows < PARALLEL_ROWS:
        serial(*args, 0, rows)
    else:
        parallel(*args, numba_threads())


def numba_threads() -> int:
    """Give numba's parallel loops as many threads as torch has (not more than numba started).

    numba's setting is per calling thread; it is set again only when torch's count changed,
    since setting it costs a sizeable fraction of a decode-sized kernel call."""
    torch_threads = torch.get_num_threads()
    if getattr(_numba_set, "torch_threads", None) != torch_threads:
        import numba
        start_numba()
        _numba_set.threads = min(torch_threads, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(_numba_set.threads)
        _numba_set.torch_threads = torch_threads
    return int(_numba_set.threads)


_helpers_lock = threading.Lock()
_interpreted_helpers: dict[Any, Any] = {}


@contextlib.contextmanager
def _interpreting_helpers() -> Iterator[None]:
    """While an interpreted kernel runs, a call to a compiled @triton.jit helper is interpreted."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        fn = _interpreted_helpers.get(self.fn)
        if fn is None:
            fn = _interpreted_helpers[self.fn] = InterpretedFunction(self.fn)
        return fn(*args, **kwargs)

    with _helpers_lock:
        original = JITFunction.__call__
        JITFunction.__call__ = call  # type: ignore[method-assign]
        try:
            yield
        finally:
            JITFunction.__call__ = original  # type: ignore[method-assign]


class LazyModule(types.ModuleType):
    """A module imported on first attribute access (kernel modules' `triton` and `tl`)."""

    def load(self) -> types.ModuleType:
        return importlib.import_module(self.__name__)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):          # introspection (pytest, inspect) must not import it
            raise AttributeError(attr)
        return getattr(self.load(), attr)


triton = LazyModule("triton")
tl = LazyModule("triton.language")


def _bind_modules(fn: Callable[..., Any]) -> None:
    """Put the real modules in place of the lazy ones in fn's globals (its module's)."""
    scope = fn.__globals__
    for name, value in list(scope.items()):
        if isinstance(value, LazyModule):
            scope[name] = value.load()


class _InterpretedLaunch:
    def __init__(self, launch: Any) -> None:
        self.launch = launch

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _interpreting_helpers():
            return self.launch(*args, **kwargs)


class LazyKernel:
    """`@jit` kernel: `kernel[grid](*args)` compiles it, or interprets it under TRITON_INTERPRET."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Any = None
        self._interpreted: Any = None
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def __getitem__(self, grid: Any) -> Any:
        if self._compiled is None and self._interpreted is None:
            _bind_modules(self.fn)
        if interpreting():
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction
                self._interpreted = InterpretedFunction(self.fn)
            return _InterpretedLaunch(self._interpreted[grid])
        if self._compiled is None:
            from triton.runtime.jit import JITFunction
            self._compiled = JITFunction(self.fn)
        return self._compiled[grid]


def jit(fn: Callable[..., Any]) -> LazyKernel:
    """Like `triton.jit` for a self-contained kernel (one that calls no other jit function)."""
    return LazyKernel(fn)
