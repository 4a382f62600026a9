"""benchmarks/gateway_overhead.py on the tiny model: the same requests through the engine and
through the gateway's SSE, every stream to its last token (the benchmark checks the counts, from
the usage chunk on the gateway side), one summary line with both rates."""
from __future__ import annotations

import re

from benchmarks import gateway_overhead


def test_one_round_counts_every_token_on_both_sides(tiny_model_dir, capsys, monkeypatch):
    # The benchmark sets the process's logging up once, on the stderr of the moment: here that is
    # this test's capture, closed after it, and every later test's log line would fail on it.
    monkeypatch.setattr(gateway_overhead.logs, "configure", lambda **kwargs: None)
    gateway_overhead.main(["--model", str(tiny_model_dir), "--dtype", "float32",
                           "--concurrency", "3", "--new-tokens", "5", "--prompt-tokens", "12",
                           "--rounds", "1"])
    out = capsys.readouterr().out
    assert re.search(r"^cpu: \S", out, re.M), out
    rounds = re.findall(r"round 1: engine ([\d.]+) tok/s \(loop CPU ([\d.]+) s\), "
                        r"gateway ([\d.]+) tok/s \(loop CPU ([\d.]+) s\)", out)
    assert len(rounds) == 1 and float(rounds[0][0]) > 0 and float(rounds[0][2]) > 0
    summary = re.search(r"gateway_overhead dtype=float32 concurrency=3 prompt=12 new=5 rounds=1: "
                        r"engine ([\d.]+) tok/s, gateway ([\d.]+) tok/s", out)
    assert summary is not None, out
