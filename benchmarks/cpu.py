"""The CPU a benchmark ran on: its model name and the vector / matrix extensions that pick our
kernels' paths. Every benchmark table prints this line: a figure holds only for its CPU."""
from __future__ import annotations

import platform
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_line() -> str:
    """e.g. 'AMD EPYC 9R14, 2 logical CPUs: avx2 fma avx512f avx512_bf16 (no amx_bf16 amx_tile)'."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    count = info.count("processor\t:") or "?"
    have = [f for f in FLAGS if f in flags]
    missing = [f for f in FLAGS if f not in flags]
    return (f"{model}, {count} logical CPUs: {' '.join(have) or 'none of ' + ' '.join(FLAGS)}"
            + (f" (no {' '.join(missing)})" if missing and have else ""))


if __name__ == "__main__":
    print(cpu_line())
