"""What Ray Serve in front costs: added latency per request, and tokens/s with 1 and 2 replicas.

    python -m benchmarks.router_overhead [--model M] [--requests 100] [--concurrency 8]
                                         [--max-tokens 64] [--num-threads 1]

1. One process (`plumbline serve`, a subprocess) and the Ray Serve application with one
   replica, same engine settings: `--requests` sequential requests with max_tokens 1 each;
   the added latency is the difference of the p50s (and of the p99s).
2. Aggregate generated tokens/s of `--concurrency` streams (max_tokens, ignore_eos) on one
   process, one replica and two replicas (`--num-threads` threads each: on 2 cores, two
   replicas of one thread against one process of one thread).

Run it on a quiet machine; prints one summary line at the end.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


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


def latencies(url: str, model: str, n: int) -> list[float]:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    out = []
    with httpx.Client(base_url=url, timeout=120) as client:
        client.post("/v1/chat/completions", json=body)        # warm-up
        for i in range(n):
            body["messages"][0]["content"] = f"Hi {i}"        # no two share a prefix-cache hit
            t0 = time.perf_counter()
            client.post("/v1/chat/completions", json=body).raise_for_status()
            out.append(time.perf_counter() - t0)
    return out


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--port", type=int, default=18400)
    args = p.parse_args()
    engine_args = ["--model", args.model, "--num-threads", str(args.num_threads),
                   "--dtype", "float32"]

    url = f"http://127.0.0.1:{args.port}"
    # numba's pool would start a thread per core and reset torch's count to it, whatever
    # --num-threads says (cluster.app.replica_threads): one thread here as in each replica.
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--port",
                             str(args.port), "--log-level", "warning", *engine_args], cwd=ROOT,
                            env={**os.environ, "NUMBA_NUM_THREADS": str(args.num_threads)})
    try:
        wait_ready(url)
        one_lat = latencies(url, args.model, args.requests)
        one_tps = tokens_per_s(url, args.model, args.concurrency, args.max_tokens)
    finally:
        proc.terminate()
        proc.wait(60)

    import ray
    from ray import serve

    from cluster.app import build_app
    from gateway import cli

    parser = argparse.ArgumentParser()
    cli._add_serve(parser.add_subparsers(dest="command"))
    config = cli.config_from_args(parser.parse_args(["serve", "--log-level", "warning",
                                                     *engine_args]))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port + 1})
    ray_url = f"http://127.0.0.1:{args.port + 1}"
    results: dict[int, Any] = {}
    try:
        for n in (1, 2):
            serve.run(build_app(config, n, replica_cpus=0), name="plumbline", route_prefix="/")
            wait_ready(ray_url)
            lat = latencies(ray_url, args.model, args.requests) if n == 1 else None
            results[n] = (lat, tokens_per_s(ray_url, args.model, args.concurrency,
                                            args.max_tokens))
            serve.delete("plumbline")
    finally:
        serve.shutdown()
        ray.shutdown()
    ray_lat = results[1][0]
    print(f"router_overhead: added p50 {pct(ray_lat, 50) - pct(one_lat, 50):+.1f} ms "
          f"(one process {pct(one_lat, 50):.1f}, ray 1 replica {pct(ray_lat, 50):.1f}), "
          f"added p99 {pct(ray_lat, 99) - pct(one_lat, 99):+.1f} ms; tokens/s: one process "
          f"{one_tps:.0f}, ray 1 replica {results[1][1]:.0f}, ray 2 replicas {results[2][1]:.0f} "
          f"({results[2][1] / one_tps:.2f}x one process, {results[2][1] / results[1][1]:.2f}x one "
          f"replica); {os.cpu_count()} cpus, "
          f"{args.num_threads} thread(s) per engine")


if __name__ == "__main__":
    main()
