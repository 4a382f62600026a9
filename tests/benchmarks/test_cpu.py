"""benchmarks/cpu.py: the CPU line every benchmark table prints."""
from __future__ import annotations

from benchmarks.cpu import cpu_line

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu avx2 fma avx512f avx512_bf16
processor\t: 1
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu avx2 fma avx512f avx512_bf16
"""


def test_line_names_family_model_count_and_the_flags_that_pick_kernels() -> None:
    assert cpu_line(CPUINFO) == ("AMD EPYC (family 26 model 2), 2 logical CPUs: avx2 fma avx512f "
                                 "avx512_bf16 (no amx_bf16 amx_tile)")


def test_line_without_family_keeps_the_model_name() -> None:
    info = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: avx2 amx_bf16 amx_tile\n"
    assert cpu_line(info) == ("Some CPU, 1 logical CPUs: avx2 amx_bf16 amx_tile "
                              "(no fma avx512f avx512_bf16)")
