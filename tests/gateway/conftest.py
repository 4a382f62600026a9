"""Gateway fixtures: a uvicorn server on a free 127.0.0.1 port in a thread, and a fake engine.

The fake implements the part of AsyncEngine the gateway uses (add_request, abort, stats,
tokenizer, core limits) and plays a scripted text, so error paths, queueing and pings are fast
and deterministic; the real engine backs the main flows in test_real_engine.py.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from engine import (EngineLimits, EngineStats, FinishReason, GenerateRequest, PreparedRequest,
                    TokenDelta, TopLogprob, validate_request)
from gateway.app import create_app
from gateway.config import GatewayConfig


class _Server(uvicorn.Server):
    loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread (with its own event loop)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = _Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        if wait_ready:
            while httpx.get(self.url + "/ready").status_code != 200:
                assert self.runtime.load_error is None, self.runtime.load_error
                assert time.monotonic() < deadline, "model did not load"
                time.sleep(0.1)
        return self

    def call(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args) on the server's event loop and return its result."""
        async def run() -> Any:
            return fn(*args)

        assert self.server.loop is not None
        return asyncio.run_coroutine_threadsafe(run(), self.server.loop).result(30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(config: GatewayConfig) -> Iterator[LiveServer]:
    """For module fixtures, `yield from serve(config)`: a live server for the module's tests."""
    live = LiveServer(create_app(config)).start()
    try:
        yield live
    finally:
        live.stop()


def sdk_client(server: LiveServer, api_key: str = "unused") -> Any:
    """The official openai client pointed at a live server, without retries."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0)


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll until true (a deadline against hangs, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


FAKE_TEXT = "Hello there! I am a fake engine, 日本語 too. The end."


class FakeEngine:
    """An `engine.EngineClient` that plays FAKE_TEXT token by token. Requests are checked by the
    engine's own `validate_request`; grammars are accepted, not compiled (the text is fixed).
    `hold` (a threading.Event) pauses every stream before its first token until set;
    `fail_after` makes the engine fail a stream after that many tokens, the way a failed model
    step does."""

    def __init__(self, tokenizer: Any, *, max_num_seqs: int = 4, max_model_len: int = 512,
                 hold: threading.Event | None = None, fail_after: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.limits = EngineLimits(max_model_len, len(tokenizer), max_num_seqs, 10.0)
        self.weights_version = 0
        self.text_ids = list(tokenizer(FAKE_TEXT, add_special_tokens=False).input_ids)
        self.hold = hold
        self.fail_after = fail_after
        self.requests: dict[str, GenerateRequest] = {}
        self.aborted: set[str] = set()
        self.aborted_seqs: list[tuple[str, int]] = []
        self.finished: set[str] = set()
        self.num_running = 0

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        for request_id in list(self.requests):
            self.abort(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=self.num_running, num_waiting=0, num_free_blocks=10,
                           num_blocks=10, num_preemptions=0)

    def server_info(self) -> dict[str, Any]:
        return {"model_path": None, "architecture": None, "vocab_size": self.limits.vocab_size,
                "lm_head_dtype": "float32", "deterministic_kernels": None}

    async def update_weights(self, state_dict: dict[str, Any], mode: str = "pause",
                             reset_cache: bool = False) -> int:
        raise ValueError("the fake engine has no weights")

    def allowed_token_counts(self, spec: Any, token_ids: Any) -> list[int] | None:
        return None                       # no compiler to replay a mask with

    def abort(self, request_id: str, index: int | None = None) -> None:
        if index is not None:             # one sequence (a choice that hit a stop string)
            self.aborted_seqs.append((request_id, index))
            return
        self.aborted.add(request_id)      # like the engine: a no-op once finished

    async def prepare(self, request: GenerateRequest) -> PreparedRequest:
        validate_request(request, self.limits)
        if request.sampling.grammar is None:
            return PreparedRequest(request)
        return PreparedRequest(request, None, "fake", 0.002)

    def add_request(self, request: PreparedRequest) -> AsyncIterator[TokenDelta]:
        generate = request.request
        self.requests[generate.request_id] = generate
        return self._play(generate)

    async def _play(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        self.num_running += 1
        try:
            params = request.sampling
            ids = self.text_ids[:params.max_tokens]
            eos = self.tokenizer.eos_token_id
            if len(ids) < params.max_tokens and not params.ignore_eos:
                ids.append(eos)
            while self.hold is not None and not self.hold.is_set():
                if request.request_id in self.aborted:
                    break
                await asyncio.sleep(0.01)
            for index in range(params.n):
                for i, token_id in enumerate(ids):
                    await asyncio.sleep(0)
                    reason = None
                    if request.request_id in self.aborted:
                        reason = FinishReason.ABORT
                    elif self.fail_after is not None and i == self.fail_after:
                        yield TokenDelta(request.request_id, index, (), (), (), FinishReason.ERROR,
                                         len(request.prompt_token_ids), i, "model step failed")
                        return
                    elif i == len(ids) - 1:
                        reason = (FinishReason.STOP if token_id == eos else FinishReason.LENGTH)
                    top = tuple(TopLogprob(t, -1.0) for t in ids[:params.logprobs or 0])
                    yield TokenDelta(request.request_id, index,
                                     () if reason is FinishReason.ABORT else (token_id,),
                                     () if reason is FinishReason.ABORT else (-0.5,),
                                     () if reason is FinishReason.ABORT else (top,),
                                     reason, len(request.prompt_token_ids), i + 1)
                    if reason is not None:
                        break
                if request.request_id in self.aborted:
                    for rest in range(index + 1, params.n):
                        yield TokenDelta(request.request_id, rest, (), (), (), FinishReason.ABORT,
                                         len(request.prompt_token_ids), 0)
                    break
        finally:
            self.num_running -= 1
            self.finished.add(request.request_id)


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.fixture()
def fake_server(tokenizer: Any) -> Iterator[Any]:
    """A factory: fake_server(config, engine_kwargs...) -> started LiveServer; `engine_cls` a
    FakeEngine subclass (test_guard_server.ScriptedEngine)."""
    servers: list[LiveServer] = []

    def make(config: GatewayConfig | None = None, engine_cls: type[FakeEngine] = FakeEngine,
             **engine_kwargs: Any) -> LiveServer:
        engine = engine_cls(tokenizer, **engine_kwargs)
        app = create_app(config or GatewayConfig(), engine_factory=lambda _: engine)
        server = LiveServer(app).start()
        server.engine = engine  # type: ignore[attr-defined]
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


def sse_events(lines: Iterator[str]) -> list[Any]:
    """Parse SSE lines into JSON payloads ("[DONE]" kept as a string, pings as ": ping")."""
    import json

    out: list[Any] = []
    for line in lines:
        if line.startswith(":"):
            out.append(line)
        elif line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out
