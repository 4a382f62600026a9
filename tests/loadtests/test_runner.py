"""The load-test runner's pieces that need no server: SSE framing, the local-only target check,
run-time parsing, percentile merging and the report it writes."""
from __future__ import annotations

import argparse
import json

import pytest

from loadtests import run as loadtest
from loadtests.sse import sse_events


def test_sse_events_frames_data_lines_and_skips_comments():
    lines = [b": ping", b"", b'data: {"a": 1}', b"", b"data: line one", b"data:line two", b"",
             b"event: x", b"id: 3", b"data: [DONE]", b""]
    assert list(sse_events(lines)) == ['{"a": 1}', "line one\nline two", "[DONE]"]


def test_sse_events_handles_crlf_and_drops_an_unterminated_event():
    lines = ["data: first\r", "\r", "data: cut off"]
    assert list(sse_events(lines)) == ["first"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "localhost:9000", "http://[::1]:80"])
def test_local_targets_are_accepted(url):
    assert loadtest.check_local(url).startswith("http")


@pytest.mark.parametrize("url", ["http://example.com", "http://10.0.0.1:8000", "http://127.0.0.2",
                                 "ftp://127.0.0.1", "http://localhost.example.com"])
def test_remote_targets_are_refused(url):
    with pytest.raises(SystemExit, match="refusing"):
        loadtest.check_local(url)


@pytest.mark.parametrize("text,seconds", [("90", 90), ("30s", 30), ("2m", 120), ("1h30m", 5400)])
def test_parse_duration(text, seconds):
    assert loadtest.parse_duration(text) == seconds


def test_parse_duration_rejects_garbage():
    with pytest.raises(SystemExit):
        loadtest.parse_duration("10 minutes")


def _entry(type_, name, requests, failures=0, p50=100, avg=100.0):
    return {"type": type_, "name": name, "requests": requests, "failures": failures,
            "avg_ms": avg, "content_bytes": 0,
            "pct_ms": {"50%": p50, "90%": p50, "95%": p50, "99%": p50}}


def test_read_stats_separates_http_requests_from_sse_measurements(tmp_path):
    stats = {"entries": [_entry("POST", "chat stream", 3, failures=1, avg=2000.0),
                         _entry("POST", "chat", 1, avg=1000.0),
                         _entry("SSE", "ttft chat stream", 3, p50=300),
                         _entry("SSE", "ttft json_schema stream", 1, p50=700),
                         _entry("SSE", "itl chat stream", 40, p50=50)],
             "errors": [{"type": "POST", "name": "chat stream", "error": "boom", "occurrences": 1}]}
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(stats))
    level = loadtest.Level(users=4)
    loadtest.read_stats(path, level)
    assert level.requests == 4
    assert level.failures == 1
    assert level.ttft["50%"] == pytest.approx((3 * 300 + 700) / 4)
    assert level.itl["50%"] == 50
    assert level.e2e_avg_ms == pytest.approx(1750.0)
    assert level.failure_lines == ["1x POST chat stream: boom"]


def test_report_files_and_summary_line(tmp_path):
    args = argparse.Namespace(scenarios=["chat"], run_time="10s", spawn_rate=2.0, max_tokens=16)
    levels = [loadtest.Level(users=u, requests=10 * u, tokens=100.0 * u, wall_s=10.0,
                             ttft={"50%": 100.0 * u, "90%": 200.0 * u, "95%": 250.0 * u,
                                   "99%": 300.0 * u},
                             itl={"50%": 20.0, "90%": 30.0, "95%": 35.0, "99%": 40.0})
              for u in (1, 8)]
    loadtest.write_summary(tmp_path, levels, args, "http://127.0.0.1:1")
    loadtest.write_plots(tmp_path, levels)
    for name in ("summary.md", "throughput.png", "ttft.png", "itl.png"):
        assert (tmp_path / name).stat().st_size > 0
    line = loadtest.one_line(levels, [], tmp_path)
    assert line.startswith("loadtest OK:") and "requests=90" in line and "failures=0" in line
    assert "tokens/s=80.0@8" in line and "ttft_p50=0.800s" in line
    failed = loadtest.one_line(levels, ["users=8: 2 failed requests"], tmp_path)
    assert failed.startswith("loadtest FAILED:") and failed.endswith("users=8: 2 failed requests")
