"""What the HTTP/SSE layer costs: the same load through the gateway and on the in-process
AsyncEngine, in one run, on one engine.

    python -m benchmarks.gateway_overhead [--concurrency 32] [--new-tokens 128] [--rounds 3]

Each request: the same ~100-token prompt (token ids, so both sides see identical input), greedy,
`ignore_eos`, `--new-tokens` new tokens. One process holds one AsyncEngine. Engine rounds iterate
`engine.generate()` directly; gateway rounds send the same requests to `create_app()` served by
uvicorn on 127.0.0.1 in this process (on that same engine), streaming `/v1/completions` over SSE
with a lean asyncio-socket client that reads every byte. Sharing the process and the engine
takes process scheduling out of the comparison (on a shared 2-core machine it swamped the
difference); the client's own CPU is charged to the gateway, so the figure is conservative.
Rounds alternate (engine, gateway, engine, ...) so drift hits both alike; one summary line
reports the medians and their ratio (target: the gateway keeps >= 95%).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from benchmarks.cpu import cpu_line
from engine import AsyncEngine, EngineConfig, GenerateRequest, SamplingParams
from gateway import logs
from gateway.app import create_app
from gateway.config import GatewayConfig

FILLER = ("The history of computing is a story of abstractions layered one on another, from "
          "switches and vacuum tubes to transistors, compilers, operating systems and networks. ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def engine_round(engine: AsyncEngine, prompt: list[int], args: argparse.Namespace) -> float:
    total = 0

    async def one(i: int) -> None:
        nonlocal total
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        async for delta in engine.generate(GenerateRequest(f"bench-{time.time()}-{i}",
                                                           tuple(prompt), params)):
            total += len(delta.token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.concurrency)))
    assert total == args.new_tokens * args.concurrency, f"{total} tokens"
    return total / (time.perf_counter() - t0)


async def stream_one(port: int, body: bytes) -> int:
    """One streaming request over a plain asyncio socket; returns completion tokens (from the
    usage chunk). A deliberately lean client, reading every byte the server sends, so the
    figure is the server's cost rather than an HTTP library's."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                 b"content-type: application/json\r\nconnection: close\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    data = bytearray()
    while chunk := await reader.read(65536):
        data += chunk
    writer.close()
    head, _, payload = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"data: [DONE]" in payload, "the stream did not finish"
    # the usage chunk: the last event with one (each event is one line of the chunked body)
    last = [line for line in payload.split(b"\n") if line.startswith(b"data: {") and b'"usage"' in line]
    return int(json.loads(last[-1][len(b"data: "):])["usage"]["completion_tokens"])


async def gateway_round(port: int, prompt: list[int], args: argparse.Namespace) -> float:
    body = json.dumps({"model": args.model, "prompt": prompt, "max_tokens": args.new_tokens,
                       "temperature": 0.0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(stream_one(port, body) for _ in range(args.concurrency)))
    assert counts == [args.new_tokens] * args.concurrency, f"streams ended early: {counts}"
    return sum(counts) / (time.perf_counter() - t0)


class SharedEngine:
    """The benchmark's engine, lent to the app: the app's lifespan must not start or stop it."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


@contextlib.asynccontextmanager
async def served_engine(model: str, max_num_seqs: int,
                        dtype: str) -> AsyncIterator[tuple[AsyncEngine, int]]:
    """An engine, and the gateway in front of it on a free port, in this event loop."""
    engine = AsyncEngine(EngineConfig(model=model, max_num_seqs=max_num_seqs, dtype=dtype))
    await engine.start()
    port = free_port()
    config = GatewayConfig(engine=engine.core.config, port=port, log_level="warning")
    logs.configure(json=True, level="warning")
    app = create_app(config, engine_factory=lambda _: SharedEngine(engine))  # type: ignore[arg-type,return-value]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    serving = asyncio.create_task(server.serve())
    try:
        while app.state.runtime.engine is None:
            await asyncio.sleep(0.05)
        yield engine, port
    finally:
        server.should_exit = True
        await serving
        await engine.shutdown()


async def main_async(args: argparse.Namespace) -> None:
    async with served_engine(args.model, args.max_num_seqs, args.dtype) as (engine, port):
        prompt = engine.tokenizer(FILLER * 8).input_ids[:args.prompt_tokens]
        # warm-up: one short round each (first-step allocations, connection setup)
        warm = argparse.Namespace(**{**vars(args), "new_tokens": 8})
        await engine_round(engine, prompt, warm)
        await gateway_round(port, prompt, warm)
        engine_tps, gateway_tps = [], []
        for r in range(args.rounds):
            # CPU time of this (event-loop) thread: the HTTP layer and the client run here
            c0 = time.thread_time()
            engine_tps.append(await engine_round(engine, prompt, args))
            c1 = time.thread_time()
            gateway_tps.append(await gateway_round(port, prompt, args))
            c2 = time.thread_time()
            print(f"round {r + 1}: engine {engine_tps[-1]:.1f} tok/s (loop CPU {c1 - c0:.2f} s), "
                  f"gateway {gateway_tps[-1]:.1f} tok/s (loop CPU {c2 - c1:.2f} s)", flush=True)
    e, g = statistics.median(engine_tps), statistics.median(gateway_tps)
    print(f"cpu: {cpu_line()}")
    print(f"gateway_overhead dtype={engine.core.runner.dtype_name} concurrency={args.concurrency} prompt={len(prompt)} "
          f"new={args.new_tokens} rounds={args.rounds}: engine {e:.1f} tok/s, "
          f"gateway {g:.1f} tok/s, gateway/engine = {100 * g / e:.1f}%")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="the engine's body dtype (auto: the server's default)")
    asyncio.run(main_async(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
