"""What Ray Serve in front costs: added latency per request, and tokens/s with 1 and 2 replicas.

    python -m benchmarks.router_overhead [--model M] [--requests 100] [--concurrency 8]
                                         [--max-tokens 64] [--num-threads 1] [--rounds 1]

Each configuration is `plumbline serve` in a subprocess, as a user starts it, with the same
engine settings (`--num-threads` threads per engine, fp32):
- one process;
- `--replicas 1`: HTTP served by the ingress in the serving process, one Ray hop (the default);
- `--replicas 1 --ray-http-proxy`: Ray's HTTP proxy and an ingress deployment (two hops);
- `--replicas 2`: tokens/s only (on 2 cores, two one-thread replicas against one process).

1. `--requests` sequential one-token chat requests: the added latency is the difference of
   the p50s (and of the p99s) against one process; also `GET /health`'s p50.
2. Aggregate generated tokens/s of `--concurrency` streams (max_tokens, ignore_eos).

Run it on a quiet machine; with `--rounds N` every figure is the median of N rounds (each
round starts every configuration once). Prints one summary line at the end.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.cpu import cpu_line

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {               # name -> (extra `plumbline serve` options, measure latency)
    "one process": ([], True),
    "ray, 1 replica": (["--replicas", "1"], True),
    "ray proxy, 1 replica": (["--replicas", "1", "--ray-http-proxy"], True),
    "ray, 2 replicas": (["--replicas", "2"], False),
}


def wait_ready(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not become ready"
        time.sleep(0.5)


def latencies(url: str, model: str, n: int) -> tuple[list[float], list[float]]:
    """Seconds per one-token chat request, and per `GET /health`, n of each."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    chat, health = [], []
    with httpx.Client(base_url=url, timeout=120) as client:
        client.post("/v1/chat/completions", json=body)        # warm-up
        for i in range(n):
            body["messages"][0]["content"] = f"Hi {i}"        # no two share a prefix-cache hit
            t0 = time.perf_counter()
            client.post("/v1/chat/completions", json=body).raise_for_status()
            t1 = time.perf_counter()
            client.get("/health").raise_for_status()
            chat.append(t1 - t0)
            health.append(time.perf_counter() - t1)
    return chat, health


def tokens_per_s(url: str, model: str, concurrency: int, max_tokens: int) -> float:
    def one(i: int) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": f"Story {i}:"}],
                "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        total = sum(pool.map(one, range(concurrency * 2)))
    return total / (time.perf_counter() - t0)


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] * 1000


def serve(extra: list[str], engine_args: list[str], port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", *engine_args, *extra],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--port", type=int, default=18400)
    args = p.parse_args()
    engine_args = ["--model", args.model, "--num-threads", str(args.num_threads),
                   "--dtype", "float32"]
    print(f"cpu: {cpu_line()}", flush=True)
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in CONFIGS}
    for _ in range(args.rounds):
        for name, (extra, with_latency) in CONFIGS.items():
            proc = serve(extra, engine_args, args.port)
            url = f"http://127.0.0.1:{args.port}"
            try:
                wait_ready(url)
                got = figures[name]
                if with_latency:
                    chat, health = latencies(url, args.model, args.requests)
                    for key, value in (("p50", pct(chat, 50)), ("p99", pct(chat, 99)),
                                       ("health", pct(health, 50))):
                        got.setdefault(key, []).append(value)
                got.setdefault("tps", []).append(
                    tokens_per_s(url, args.model, args.concurrency, args.max_tokens))
            finally:
                stop(proc)
    med = {name: {k: statistics.median(v) for k, v in got.items()} for name, got in figures.items()}
    one = med["one process"]
    for name, got in med.items():
        added = "" if name == "one process" or "p50" not in got else (
            f" added p50 {got['p50'] - one['p50']:+.1f} ms, p99 {got['p99'] - one['p99']:+.1f} ms;")
        lat = f" p50 {got['p50']:.1f} ms, p99 {got['p99']:.1f} ms, /health {got['health']:.2f} ms;" \
            if "p50" in got else ""
        print(f"{name}:{lat}{added} {got['tps']:.0f} tokens/s ({got['tps'] / one['tps']:.2f}x one "
              f"process)")
    print(f"router_overhead: {args.rounds} round(s), medians; {os.cpu_count()} cpus, "
          f"{args.num_threads} thread(s) per engine")


if __name__ == "__main__":
    main()
