"""benchmarks/engine_throughput.py on the tiny model: every run sends prompts the engine has not
seen, so no run after the first skips its prefill through the prefix cache (the figures before
2026-12-03 had runs that did)."""
from __future__ import annotations

import re

from benchmarks import engine_throughput


def test_runs_find_nothing_in_the_prefix_cache(tiny_model_dir, capsys):
    engine_throughput.main(["--model", str(tiny_model_dir), "--dtype", "float32",
                            "--concurrency", "1", "3", "--runs", "3", "--new-tokens", "4",
                            "--mixed-requests", "3", "--skip-hf"])
    out = capsys.readouterr().out
    for label in ("concurrency   1", "concurrency   3", "mixed workload "):
        rate = re.search(rf"plumbline  {label}: +([\d.]+) tok/s", out)
        assert rate is not None and float(rate.group(1)) > 0, out
    assert "prefix cache hits: 0 tokens" in out, out
