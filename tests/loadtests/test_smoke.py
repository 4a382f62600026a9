"""A short Locust run against a real server on a free port: no failed request, and the server
returns to idle with every KV block free. Correctness only; timings are never asserted."""
from __future__ import annotations

import importlib.util
import json

import pytest

# find_spec, not importorskip: importing locust monkey-patches the whole test process (gevent)
for _name in ("locust", "matplotlib"):
    if importlib.util.find_spec(_name) is None:
        pytest.skip(f"{_name} is not installed (dev extras)", allow_module_level=True)

from loadtests import run as loadtest  # noqa: E402

# Every scenario: at 8 users Locust's weights (chat 4, json 2, plain, tools, guard 1) give each
# class at least one user.
SMOKE_SCENARIOS = ["chat", "plain", "json", "tools", "guard"]


def count(rows, kind, *names):
    return sum(rows.get((kind, name), {"requests": 0})["requests"] for name in names)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smoke_8_users(tmp_path):
    args = loadtest.build_parser().parse_args([
        "--users", "8", "--spawn-rate", "8", "--run-time", "20s", "--max-tokens", "16",
        "--scenarios", *SMOKE_SCENARIOS, "--out", str(tmp_path), "--no-plots",
        "--settle-timeout", "60", "--stop-timeout", "120s"])
    report = loadtest.execute(args)

    assert report.problems == [], report.problems
    [level] = report.levels
    assert level.requests > 0
    assert level.failures == 0
    stats = json.loads((tmp_path / "users-8" / "stats.json").read_text())
    rows = {(e["type"], e["name"]): e for e in stats["entries"]}
    assert stats["errors"] == []
    assert all(e["failures"] == 0 for e in rows.values())
    # streamed chat completed and reported its first-token events; the plain routes answered
    assert rows[("POST", "chat stream")]["requests"] > 0
    assert rows[("SSE", "ttft chat stream")]["requests"] > 0
    assert count(rows, "POST", "chat", "completion") > 0
    # the agent loop made tool calls whose arguments parsed and validated (a bad one is a failure)
    assert count(rows, "POST", "tools call stream", "tools call") > 0
    assert count(rows, "SSE", "tool call get_weather") > 0
    # guarded requests ended with a verdict: passed, flagged or blocked, never leaked text
    assert count(rows, "POST", "guard block stream", "guard flag stream",
                 "guard block tools stream") > 0
    assert count(rows, "SSE", "guard passed", "guard flagged", "guard blocked") > 0
    # block answers, tool calls with deny patterns on their arguments among them, leaked nothing
    assert count(rows, "SSE", "guard leaked bytes") > 0 and level.leaked_bytes == 0
    # /metrics after the run: nothing running or waiting, no KV block held
    final = level.final_metrics
    assert final["plumbline:num_requests_running"] == 0
    assert final["plumbline:num_requests_waiting"] == 0
    assert final["plumbline:kv_cache_usage_perc"] == 0
    assert final["plumbline:generation_tokens_total"] > 0
    assert final.get("plumbline:checks_run_total", 0) > 0
    assert (tmp_path / "summary.md").exists()
