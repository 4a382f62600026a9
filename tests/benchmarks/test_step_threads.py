"""benchmarks/step_threads.py --ab on the tiny model: pairs of decode steps with and without a
module global, both timed (whole step and attention), the global put back after."""
from __future__ import annotations

from benchmarks.step_threads import ab_steps
from engine.config import EngineConfig
from engine.engine import EngineCore
from engine.types import GenerateRequest, SamplingParams
from kernels import attention


def test_ab_steps_times_both_and_restores(tiny_model_dir, capsys) -> None:
    core = EngineCore(EngineConfig(model=str(tiny_model_dir), enable_prefix_caching=False))
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i in range(3):
        core.add_request(GenerateRequest(f"s{i}", tuple(range(5 + i, 25 + i)), params))
    core.step()                                          # the prefills
    seen = []
    model_attention = core.runner.model.attention

    def spy(*a, **kw):
        seen.append(attention.PREFILL_IN_PLACE)
        return model_attention(*a, **kw)

    core.runner.model.attention = spy
    ab_steps(core, ["kernels.attention.PREFILL_IN_PLACE=false"], pairs=3)
    out = capsys.readouterr().out.splitlines()
    lines = out[next(i for i, line in enumerate(out) if line.startswith("A: as the engine")):]
    assert lines[0].startswith("A: as the engine runs   B: kernels.attention.PREFILL_IN_PLACE=false")
    for line, what in zip(lines[1:], ("whole step", "attention")):
        fields = line.split()
        assert line.startswith(what) and float(fields[-1]) > 0
    # 8 steps (a warm-up pair, 3 pairs), each layer's attention under its step's setting
    layers = len(seen) // 8
    assert layers > 0 and len(seen) == 8 * layers
    assert seen == ([True] * layers + [False] * layers) * 4
    assert attention.PREFILL_IN_PLACE is True and core.runner.model.attention is spy
    assert all(s.num_completion_tokens == 9 for s in core.scheduler.running)
