"""The CPU a benchmark ran on: its model name and the vector / matrix extensions that pick our
kernels' paths. Every benchmark table prints this line: a figure holds only for its CPU."""
from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_line(info: str | None = None) -> str:
    """e.g. 'AMD EPYC (family 26 model 2), 2 logical CPUs: avx2 fma avx512f avx512_bf16 (no
    amx_bf16 amx_tile)'. The family and model number tell apart CPUs that a VM names alike
    ("AMD EPYC" on Zen 4, family 25, and on Zen 5, family 26). info: /proc/cpuinfo's text."""
    if info is None:
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model, flags = platform.processor() or platform.machine(), set()
    fields: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu family", "model") and key not in fields:
            fields[key] = value.strip()
        elif key == "flags":
            flags = set(value.split())
    model = fields.get("model name", model)
    if "cpu family" in fields:
        model += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    count = info.count("processor\t:") or "?"
    have = [f for f in FLAGS if f in flags]
    missing = [f for f in FLAGS if f not in flags]
    return (f"{model}, {count} logical CPUs: {' '.join(have) or 'none of ' + ' '.join(FLAGS)}"
            + (f" (no {' '.join(missing)})" if missing and have else ""))


def no_avx512_env(cache_dir: str | None = None) -> dict[str, str]:
    """os.environ plus what makes numba compile for this CPU without AVX-512 and AMX (the code an
    AVX2-only CPU runs, e.g. kernels.prefill_cpu's eight-lane vectors), on a CPU that has them:
    NUMBA_CPU_NAME=haswell, NUMBA_CPU_FEATURES the host's with those turned off, and a numba
    cache of its own (by default a new temporary directory)."""
    from llvmlite import binding
    binding.initialize_native_target()
    features = binding.get_host_cpu_features()
    features.update({f: False for f in features if f.startswith(("avx512", "amx", "avx10", "evex512"))})
    return {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": features.flatten(),
            "NUMBA_CACHE_DIR": cache_dir or tempfile.mkdtemp(prefix="numba-no-avx512-")}


if __name__ == "__main__":
    print(cpu_line())
