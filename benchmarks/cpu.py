"""The CPU a benchmark ran on: its model name and the vector / matrix extensions that pick our
kernels' paths. Every benchmark table prints this line: a figure holds only for its CPU."""
from __future__ import annotations

import platform
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


if __name__ == "__main__":
    print(cpu_line())
