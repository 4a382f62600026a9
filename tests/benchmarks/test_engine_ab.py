"""benchmarks/engine_ab.py's module globals: set around a round, put back after, and a name the
module lacks refused."""
from __future__ import annotations

import pytest

from benchmarks.engine_ab import module_values
from kernels import attention, decode_cpu


def test_module_values_set_and_restore() -> None:
    assert decode_cpu.WIDEN_ONCE and attention.PREFILL_IN_PLACE
    with module_values(["kernels.decode_cpu.WIDEN_ONCE=false",
                        "kernels.attention.PREFILL_IN_PLACE=false"]):
        assert decode_cpu.WIDEN_ONCE is False and attention.PREFILL_IN_PLACE is False
    assert decode_cpu.WIDEN_ONCE is True and attention.PREFILL_IN_PLACE is True


def test_module_values_restores_after_an_error_and_refuses_unknown_names() -> None:
    with pytest.raises(RuntimeError):
        with module_values(["kernels.decode_cpu.WIDEN_ONCE=false"]):
            raise RuntimeError("round failed")
    assert decode_cpu.WIDEN_ONCE is True
    with pytest.raises(SystemExit, match="no CHUNKY"):
        with module_values(["kernels.decode_cpu.WIDEN_ONCE=false", "kernels.decode_cpu.CHUNKY=1"]):
            pass
    assert decode_cpu.WIDEN_ONCE is True and not hasattr(decode_cpu, "CHUNKY")
