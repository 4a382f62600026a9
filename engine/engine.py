"""The engine: a synchronous core (shared with the offline `LLM`) and `AsyncEngine`, whose loop
runs as an asyncio task and all of its torch work (load, steps, weight builds) on one compute
thread."""
from __future__ import annotations

import asyncio
import collections.abc
import concurrent.futures
import os
from collections.abc import AsyncIterator
from typing import Any

import structlog
from transformers import AutoTokenizer

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.loader import resolve_model
from engine.model_runner import ModelRunner
from engine.request_stream import RequestStream
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.interface import (EngineLimits, EngineStats, PreparedRequest, UpdateMode,
                              validate_request)
from engine.types import EMPTY_RESULT, Batch, GenerateRequest, RequestError, StepResult, TokenDelta
from grammars import CompiledGrammar, GrammarCompiler, GrammarError, allowed_token_counts
from grammars.spec import GrammarSpec
from grammars.steering import Steering
from kernels import invariant

log = structlog.get_logger("plumbline.engine")

_MASK64 = (1 << 64) - 1


class EngineCore:
    """Tokenizer, runner, block manager and scheduler; one step = schedule -> run -> postprocess."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_dir = resolve_model(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.runner = ModelRunner(config, self.model_dir)
        capacity = self.runner.num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or self.runner.max_position_embeddings,
                                 capacity)
        # Fast-forward and budget-aware closing: grammar policy lives in grammars/steering.py.
        self.steering = Steering(self.runner.vocab_size, fast_forward=config.grammar_fast_forward,
                                 close_reserve=config.grammar_close_reserve,
                                 tokenizer=self.tokenizer, eos_token_ids=self.eos_token_ids())
        self.runner.steering = self.steering
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size,
                                   prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.blocks, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids(),
            enable_chunked_prefill=config.enable_chunked_prefill,
            steering=self.steering, weights_version=lambda: self.runner.weights_version)
        self.grammars = GrammarCompiler(self.tokenizer, backend=config.grammar_backend,
                                        vocab_size=self.vocab_size)

    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(self.runner.hf_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def limits(self) -> EngineLimits:
        return EngineLimits(self.max_model_len, self.vocab_size, self.config.max_num_seqs,
                            self.config.grammar_compile_timeout)

    def add_request(self, request: GenerateRequest, grammar: CompiledGrammar | None = None, *,
                    is_validated: bool = False) -> list[Sequence]:
        """Validate (unless the caller has) and enqueue; raises RequestError for what the engine
        cannot take.

        A request with a grammar spec and no compiled `grammar` compiles it here, blocking
        (the offline path); AsyncEngine compiles off the loop and passes the result."""
        if not is_validated:
            self.validate(request)
        spec = request.sampling.grammar
        if spec is not None and grammar is None:
            try:
                grammar = self.grammars.compile(spec)
            except GrammarError as e:
                raise RequestError(str(e), "response_format") from None
        params = request.sampling
        base = params.seed if params.seed is not None else self.runner.next_seed()
        seqs = []
        for i in range(params.n):
            # Each of n samples gets its own stream, fixed by (seed, index) alone.
            seed = (base + i * 0x9E3779B97F4A7C15) & _MASK64 if i else base
            seq = Sequence(request.request_id, i, list(request.prompt_token_ids),
                           len(request.prompt_token_ids), params, seed)
            seq.grammar = grammar.matcher() if grammar is not None else None
            self.scheduler.add(seq)
            seqs.append(seq)
        return seqs

    def validate(self, request: GenerateRequest) -> None:
        """Raise RequestError for a request the engine cannot take."""
        validate_request(request, self.limits)

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.scheduler.abort(request_id, index)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def run(self, batch: Batch) -> StepResult:
        return self.runner.run(batch) if batch.seqs else EMPTY_RESULT

    def step(self) -> list[TokenDelta]:
        """One synchronous step (the offline path)."""
        batch = self.scheduler.schedule()
        return self.deltas(self.scheduler.postprocess(batch, self.run(batch)))

    @staticmethod
    def deltas(changed: list[Sequence]) -> list[TokenDelta]:
        out = []
        for seq in changed:
            start = seq.num_sent_tokens
            seq.num_sent_tokens = seq.num_completion_tokens
            first = start == 0 and seq.sampling.prompt_logprobs is not None
            out.append(TokenDelta(
                seq.request_id, seq.index, tuple(seq.completion_token_ids[start:]),
                tuple(seq.logprobs[start:]), tuple(seq.top_logprobs[start:]),
                seq.finish_reason, seq.num_prompt_tokens, seq.num_completion_tokens, seq.error,
                tuple(seq.prompt_logprobs or [None]) if first else None,
                tuple(seq.weights_versions[start:]), seq.num_cached_tokens,
                closed_early=seq.json_scan is not None and seq.json_scan.steered))
        return out

    def stats(self) -> EngineStats:
        s = self.scheduler
        b = self.blocks
        return EngineStats(len(s.running), len(s.waiting), b.num_free_blocks, b.num_blocks,
                           s.num_preemptions, s.num_forced_tokens, b.num_queried_tokens,
                           b.num_hit_tokens)


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, core: EngineCore | None = None) -> None:
        """Loads the model of `config`, or drives an already loaded `core`."""
        assert (config is None) != (core is None), "give a config or a core"
        # All of the engine's torch work (loading, steps, weight builds) runs on this one thread.
        # Each thread that enters an OpenMP region gets its own team of workers; with two teams
        # on 2 cores a decode step of 32 sequences took 1.5-1.9x as long as with one (anyio's
        # pool may hand each step to another thread).
        self._compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="plumbline-compute")
        self.core = core if core is not None else self._compute.submit(EngineCore, config).result()
        self.tokenizer = self.core.tokenizer
        self._streams: dict[str, RequestStream] = {}
        self._compiling: dict[str, asyncio.Task[None]] = {}
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.num_steps = 0

    @property
    def limits(self) -> EngineLimits:
        return self.core.limits

    async def prepare(self, request: GenerateRequest) -> PreparedRequest:
        """Validate and compile the request's grammar (off the loop), once, before its response
        starts; raises RequestError. `add_request` takes the result as it is."""
        self.core.validate(request)
        spec = request.sampling.grammar
        if spec is None:
            return PreparedRequest(request)
        compiler = self.core.grammars
        try:
            grammar = await compiler.compile_async(
                spec, timeout=self.core.config.grammar_compile_timeout)
        except GrammarError as exc:
            raise RequestError(f"the grammar cannot be used: {exc}", "response_format") from None
        return PreparedRequest(request, grammar, grammar.backend, compiler.compile_time(spec))

    def server_info(self) -> dict[str, Any]:
        """What the loaded engine knows of itself (the gateway's /v1/server_info adds settings)."""
        runner = self.core.runner
        return {"model_path": str(self.core.model_dir),
                "dtype": runner.dtype_name, "dtype_reason": runner.dtype_reason,
                "device": runner.device_name, "device_reason": runner.device_reason,
                "cuda_graphs": None if runner.graphs is None else runner.graphs.sizes,
                "architecture": runner.hf_config.model_type,
                "vocab_size": self.core.vocab_size,
                "num_threads": runner.num_threads,
                "cpu_bind": list(runner.cpu_binding.team_cpus),
                "cpu_bind_loop": list(runner.cpu_binding.loop_cpus),
                "cpu_bind_reason": runner.cpu_binding.reason,
                "lm_head_dtype": str(runner.model.lm_head.dtype).removeprefix("torch."),
                "lm_head_precision": runner.head_precision, "lm_head_reason": runner.head_reason,
                "deterministic_kernels": (dict(invariant.KERNELS)
                                          if self.core.config.deterministic else None)}

    def allowed_token_counts(self, spec: GrammarSpec, token_ids: collections.abc.Sequence[int]) -> list[int]:
        """How many tokens the grammar allowed before each of token_ids, replayed (a cache hit:
        the request compiled the grammar already)."""
        return allowed_token_counts(self.core.grammars.compile(spec), token_ids)

    async def update_weights(self, state_dict: dict[str, Any], mode: UpdateMode = "pause",
                             reset_cache: bool = False) -> int:
        """Swap in new weights while serving; returns the new weights version.

        pause: finish the current step, swap, resume (the KV cache is kept unless reset_cache);
        drain: stop admitting new requests, let running ones finish, swap, resume;
        abort: abort running requests, swap. reset_cache recomputes running sequences' KV with
        the new weights (they are preempted). Tokens report the version they were sampled with."""
        if mode not in ("pause", "drain", "abort"):
            raise RequestError("mode must be 'pause', 'drain' or 'abort'", "mode")
        async with self._update_lock:
            # Build off the loop first, on the compute thread between steps (seconds for a big
            # model); the swap itself is instant.
            model = await self._in_compute_thread(self.core.runner.build_model, state_dict)
            scheduler = self.core.scheduler
            try:
                if mode == "drain":
                    scheduler.admitting = False
                    while scheduler.running or any(s.num_preemptions for s in scheduler.waiting):
                        await asyncio.sleep(0.005)
                elif mode == "abort":
                    for request_id in {s.request_id for s in scheduler.running}:
                        self.abort(request_id)
                    while scheduler.running:
                        await asyncio.sleep(0.005)
                async with self._step_lock:
                    version = self.core.runner.swap_model(model)
                    if reset_cache:
                        for seq in list(scheduler.running):
                            scheduler.preempt(seq)
            finally:
                scheduler.admitting = True
                if self._wakeup is not None:
                    self._wakeup.set()
            log.info("weights_updated", version=version, mode=mode, reset_cache=reset_cache)
            return version

    async def _in_compute_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    @property
    def weights_version(self) -> int:
        return self.core.runner.weights_version

    async def start(self) -> None:
        self._step_lock = asyncio.Lock()
        self._update_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        binding = self.core.runner.cpu_binding
        if binding.loop_cpus:
            # The loop, and the threads it starts from now on (grammar compiles, tokenizers),
            # off the compute team's cores (engine/cpu_bind.py).
            os.sched_setaffinity(0, binding.loop_cpus)
        self._task = asyncio.create_task(self._loop(), name="plumbline-engine")

    async def shutdown(self) -> None:
        for request_id in list(self._streams):
            self.abort(request_id)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def add_request(self, request: GenerateRequest | PreparedRequest) -> RequestStream:
        """Enqueue; raises RequestError at once for a bad request. Iterate the stream for deltas.
        A PreparedRequest (`prepare`) is taken as it is: validated, its grammar compiled."""
        if self._task is None or self._task.done():
            raise RuntimeError("the engine is not running")
        prepared = request if isinstance(request, PreparedRequest) else None
        request = request.request if isinstance(request, PreparedRequest) else request
        if request.request_id in self._streams:
            raise RequestError(f"request id {request.request_id!r} is already in use", "request_id")
        if prepared is None:
            self.core.validate(request)
        stream = RequestStream(request.request_id, request.sampling.n, self)
        self._streams[request.request_id] = stream
        if prepared is not None or request.sampling.grammar is None:
            self._enqueue(request, None if prepared is None else prepared.grammar)
        else:
            # The request waits for its grammar (WAITING_FOR_GRAMMAR) without blocking others.
            stream._ready_future = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._compile_then_enqueue(request, stream))
            self._compiling[request.request_id] = task
        return stream

    def _enqueue(self, request: GenerateRequest, grammar: CompiledGrammar | None) -> None:
        self.core.add_request(request, grammar, is_validated=True)   # by add_request or prepare
        assert self._wakeup is not None
        self._wakeup.set()

    async def _compile_then_enqueue(self, request: GenerateRequest, stream: RequestStream) -> None:
        spec = request.sampling.grammar
        assert spec is not None
        try:
            compiled = await self.core.grammars.compile_async(
                spec, timeout=self.core.config.grammar_compile_timeout)
            self._enqueue(request, compiled)
        except GrammarError as e:
            self._streams.pop(request.request_id, None)
            stream._fail(RequestError(str(e), "response_format"))
        except asyncio.CancelledError:             # aborted while compiling
            self._streams.pop(request.request_id, None)
            stream._fail(RequestError("request aborted while its grammar compiled", None))
            raise
        else:
            stream._ready_future.set_result(None)
        finally:
            self._compiling.pop(request.request_id, None)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Async iterator of deltas; leaving it early aborts the request."""
        stream = self.add_request(request)
        try:
            async for delta in stream:
                yield delta
        finally:
            if not stream.finished:
                self.abort(request.request_id)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Abort the request, or only its sequence `index` (its siblings go on); the blocks are
        freed at the next postprocess."""
        task = self._compiling.get(request_id)
        if task is not None:
            if index is None:            # no sequence exists before the grammar compiled
                task.cancel()
        elif request_id in self._streams:
            self.core.abort(request_id, index)
            if self._wakeup is not None:
                self._wakeup.set()

    def stats(self) -> EngineStats:
        return self.core.stats()

    async def _loop(self) -> None:
        assert self._wakeup is not None
        scheduler = self.core.scheduler
        while True:
            self._wakeup.clear()
            if not scheduler.has_work():
                await self._wakeup.wait()
                continue
            async with self._step_lock:            # a weight swap waits for the step to end
                batch = scheduler.schedule()
                result, error = EMPTY_RESULT, None
                if batch.seqs:
                    try:
                        result = await self._in_compute_thread(self.core.run, batch)
                    except Exception as exc:  # one failed step fails its batch, never the loop
                        log.exception("model_step_failed", num_seqs=len(batch.seqs))
                        error = f"internal error in the model step ({type(exc).__name__})"
                self.num_steps += 1
                for delta in self.core.deltas(scheduler.postprocess(batch, result, error)):
                    stream = self._streams.get(delta.request_id)
                    if stream is not None:
                        stream.put(delta)
                self._forget_finished()
            if not batch.seqs:
                # Work is queued but nothing fits yet (cannot last: validation bounds every
                # request by the cache); yield instead of spinning.
                await asyncio.sleep(0.001)

    def _forget_finished(self) -> None:
        live = {s.request_id for s in (*self.core.scheduler.running, *self.core.scheduler.waiting)}
        live.update(self._compiling)
        for request_id in [r for r in self._streams if r not in live]:
            del self._streams[request_id]
