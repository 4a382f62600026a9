"""`plumbline serve` as a real process: SIGTERM drains running streams, then the process exits."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from gateway.cli import config_from_args, main
from tests.gateway.conftest import sse_events

MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_builds_the_config(tmp_path):
    import argparse

    keys = tmp_path / "keys"
    keys.write_text("# team keys\nk1\n\nk2\n")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    from gateway.cli import _add_serve
    _add_serve(sub)
    args = parser.parse_args(["serve", "--port", "9001", "--api-key", "k0", "--api-key-file",
                              str(keys), "--max-num-seqs", "8", "--max-queued-requests", "3",
                              "--strict-fields"])
    config = config_from_args(args)
    assert config.port == 9001 and config.api_keys == ("k0", "k1", "k2")
    assert config.engine.max_num_seqs == 8 and config.max_queued_requests == 3
    assert config.engine.dtype == "auto"           # the server picks the body for its CPU
    assert config_from_args(parser.parse_args(["serve", "--dtype", "float32"])).engine.dtype == "float32"
    assert config.strict_fields and not config_from_args(
        parser.parse_args(["serve"])).strict_fields
    assert main(["serve", "--port", "0"]) == 2          # a bad value: message, no traceback


@pytest.mark.slow
def test_sigterm_lets_running_streams_finish_then_exits():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--max-num-seqs", "4",
         "--kv-cache-memory-mb", "64", "--drain-timeout", "120", "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")          # it is running
            proc.send_signal(signal.SIGTERM)
            try:   # refused: either the listener is closed or the app says 503
                status = httpx.post(url + "/v1/completions", json=body, timeout=10).status_code
                assert status == 503
            except httpx.TransportError:
                pass
            events = sse_events(lines)
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once shut down, so the exit status says "terminated by
        # SIGTERM" as process managers expect; the log says the shutdown was orderly
        assert proc.wait(60) in (0, -signal.SIGTERM)
        records = [json.loads(line) for line in proc.stderr.read().decode().splitlines()
                   if line.startswith("{")]
        assert {"drain_started", "request_finished", "server_stopped"} <= {r["event"] for r in records}
        (summary,) = [r for r in records if r.get("path") == "/v1/completions"  # one per request
                      and r["event"] == "request_finished" and r["status"] == 200]
        assert summary["completion_tokens"] == 12
        assert summary["finish_reason"] == "length" and summary["ttft_ms"] > 0
        assert summary["request_id"] and summary["duration_ms"] >= summary["ttft_ms"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
