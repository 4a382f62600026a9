"""`plumbline serve --replicas 1` as a user runs it: a process that starts a local Ray, serves
HTTP itself, and on SIGTERM takes its replica and its Ray instance down with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import free_port

pytest.importorskip("ray", reason="ray[serve] is not installed (the cluster extra)")
ROOT = Path(__file__).resolve().parents[2]


def descendants(pid: int) -> set[int]:
    """Every process under pid (Ray's GCS, raylet, workers: children of the driver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def niceness(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_serve_with_replicas_answers_then_sigterm_takes_ray_down(tiny_model_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--replicas", "1", "--host", "127.0.0.1",
         "--port", str(port), "--model", str(tiny_model_dir), "--num-threads", "1",
         "--kv-cache-memory-mb", "32", "--log-format", "json"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while True:      # a deadline against hangs, not a timing assertion
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the replicas did not become ready"
            try:
                if httpx.get(url + "/ready", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": str(tiny_model_dir), "max_tokens": 3,
            "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-plumbline-replica"] and r.headers["x-request-id"]
        assert r.json()["usage"]["completion_tokens"] == 3
        ray_processes = descendants(proc.pid)
        assert ray_processes                 # the local Ray this process started
        # the engine replica runs at the priority of Ray's own processes, not at nice 15
        (replica,) = [p for p in ray_processes if title(p).startswith("ray::ServeReplica")
                      and ":engine" in title(p)]
        assert niceness(replica) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(180) == 0
        deadline = time.monotonic() + 60
        while [p for p in ray_processes if alive(p)]:
            assert time.monotonic() < deadline, "Ray's processes outlived the server"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
