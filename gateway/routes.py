"""Endpoints. Thin: parse -> tokenize -> queue -> `Generation` -> SSE chunks or one JSON body."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine import GenerateRequest, RequestError, SamplingParams
from grammars import GrammarError, GrammarSpec
from grammars.tools import ToolsRequest, render_prompt, tool_call_grammar
from gateway import protocol as p
from gateway.logs import log_fields
from gateway.guard import GuardPlan, Trace, plan_guard
from gateway.sse import DONE, DeferredJSONResponse, EventStreamResponse, frame
from gateway.state import Runtime
from gateway.stream import ChoiceUpdate, Generation
from gateway.tokens import TokenTable

Endpoint = Callable[[Request], Any]


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.state.runtime
    return rt


# ----------------------------------------------------------------------------- plain endpoints


async def health(request: Request) -> Response:
    rt = runtime(request)
    if rt.load_error is not None:
        return JSONResponse({"status": "failed", "error": "the model failed to load"}, 503)
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    rt = runtime(request)
    try:
        rt.ready()
    except p.APIError as exc:
        return JSONResponse(exc.body(), exc.status)
    return JSONResponse({"status": "ready", "model": rt.config.model_name})


async def metrics(request: Request) -> Response:
    from gateway.metrics import CONTENT_TYPE

    rt = runtime(request)
    return Response(rt.metrics.render(rt), media_type=CONTENT_TYPE)


def _model_card(rt: Runtime) -> dict[str, Any]:
    card: dict[str, Any] = {"id": rt.config.model_name, "object": "model",
                            "created": rt.started_at, "owned_by": "plumbline"}
    if rt.engine is not None:
        card["max_model_len"] = rt.max_model_len
    return card


async def list_models(request: Request) -> Response:
    rt = runtime(request)
    return JSONResponse({"object": "list", "data": [_model_card(rt)]})


async def get_model(request: Request) -> Response:
    rt = runtime(request)
    check_model(rt, request.path_params["model"])
    return JSONResponse(_model_card(rt))


def check_model(rt: Runtime, model: str) -> None:
    if model not in (rt.config.model_name, rt.config.engine.model):
        raise p.NotFound(f"the model '{model}' does not exist; this server serves "
                         f"'{rt.config.model_name}'", "model", code="model_not_found")


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON: 413 beyond max_bytes, 400 for invalid UTF-8 or JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise p.PayloadTooLarge(f"the request body exceeds {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise p.PayloadTooLarge(f"the request body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise p.BadRequest("the request body is not valid UTF-8") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise p.BadRequest(f"the request body is not valid JSON: {exc.msg} at position "
                           f"{exc.pos}") from None


def _reject_constant(name: str) -> Any:
    raise p.BadRequest(f"{name} is not valid JSON")


# ------------------------------------------------------------------------------ shared pieces


def check_fits(rt: Runtime, prompt_ids: Sequence[int], params: SamplingParams,
               prompt_param: str) -> None:
    """The engine's admission checks, made before the response starts so that they stay 400s
    rather than error events."""
    assert rt.engine is not None and rt.admission is not None
    try:
        rt.engine.core.validate(GenerateRequest("validate", tuple(prompt_ids), params))
    except RequestError as exc:
        param = prompt_param if exc.param in ("prompt", "messages") else exc.param
        raise p.BadRequest(exc.message, param) from None
    if params.n > rt.admission.capacity:
        raise p.BadRequest(f"n must be <= {rt.admission.capacity}", "n")
    vocab_size = int(rt.engine.core.vocab_size)
    if any(not 0 <= t < vocab_size for t in params.stop_token_ids):
        raise p.BadRequest(f"stop_token_ids must lie in [0, {vocab_size})", "stop_token_ids")


async def precompile(rt: Runtime, spec: GrammarSpec | None, param: str = "response_format") -> None:
    """Compile a request's grammar before the response starts, so a grammar that fails to compile
    (or times out) is a 400, never an error event mid-stream; the engine then hits the cache."""
    if spec is None:
        return
    assert rt.engine is not None
    core = rt.engine.core
    try:
        await core.grammars.compile_async(spec, timeout=core.config.grammar_compile_timeout)
    except GrammarError as exc:
        raise p.BadRequest(f"the grammar cannot be used: {exc}", param) from None


async def respond(request: Request, rt: Runtime, req: Any, kind: str, prompt_ids: Sequence[int],
                  params: SamplingParams, formatter: Any, plan: GuardPlan,
                  tools: ToolsRequest | None = None) -> Any:
    """The shared tail of both generation routes: admission checks, grammar, then the stream
    (SSE) or the collected JSON body."""
    check_fits(rt, prompt_ids, params, "messages" if kind == "chatcmpl" else "prompt")
    await precompile(rt, params.grammar, "tools" if tools is not None else "response_format")
    gen = start(request, rt, kind, prompt_ids, params, req.skip_special_tokens, plan, tools)
    fmt = formatter(rt, gen, req)
    if req.stream:
        return EventStreamResponse(fmt.events(), ping_interval=rt.config.keepalive_interval_s,
                                   on_close=closer(request, gen))
    return DeferredJSONResponse(fmt.body, on_close=closer(request, gen))


def start(request: Request, rt: Runtime, kind: str, prompt_ids: Sequence[int],
          params: SamplingParams, skip_special_tokens: bool, plan: GuardPlan | None = None,
          tools: ToolsRequest | None = None) -> Generation:
    engine, admission = rt.ready()
    ticket = admission.enter(params.n)
    request_id = f"{kind}-{uuid.uuid4().hex}"
    trace = rt.traces.open(Trace(
        request_id, structlog.contextvars.get_contextvars().get("request_id"),
        "chat.completion" if kind == "chatcmpl" else "text_completion", list(prompt_ids),
        params.logprobs_mode, spec=params.grammar,
        guard=None if plan is None else {"mode": plan.policy.mode, "release": plan.policy.release,
                                         "checks": plan.policy.checks, "pinned": plan.pinned}))
    if params.grammar is not None:
        compiler = engine.core.grammars
        compile_s = compiler.compile_time(params.grammar)
        trace.grammar = {"kind": params.grammar.kind, "backend": compiler.backend,
                         "compile_ms": None if compile_s is None else round(compile_s * 1000, 3)}
    gen = Generation(rt, request_id, prompt_ids, params, ticket,
                     skip_special_tokens=skip_special_tokens, parse_tool_calls=tools is not None,
                     plan=plan, trace=trace)
    log_fields(request.scope)["completion_id"] = gen.request_id
    return gen


def closer(request: Request, gen: Generation) -> Callable[[], None]:
    """Runs once when the response ends, whatever happened: slot, metrics, summary line."""
    fields = log_fields(request.scope)

    def close() -> None:
        gen.close()
        o = gen.outcome
        fields.update(prompt_tokens=o.num_prompt_tokens, completion_tokens=o.num_completion_tokens,
                      finish_reason=",".join(o.finish_reasons) or None,
                      ttft_ms=None if o.ttft_s is None else round(o.ttft_s * 1000, 1),
                      queue_ms=None if o.queue_s is None else round(o.queue_s * 1000, 1))
        verdicts = [v for v in (gen.trace.verdicts if gen.trace is not None else []) if v]
        if verdicts:   # the guard's verdict in short: passed | flagged | blocked, per choice
            fields["checks"] = ",".join("blocked" if v["blocked"] else
                                        "passed" if v["passed"] else "flagged" for v in verdicts)
    return close


def usage(gen: Generation) -> dict[str, Any]:
    o = gen.outcome
    return {"prompt_tokens": o.num_prompt_tokens, "completion_tokens": o.num_completion_tokens,
            "total_tokens": o.num_prompt_tokens + o.num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": o.num_cached_tokens}}


def plumbline_extension(params: SamplingParams) -> dict[str, Any]:
    return {"logprobs_mode": params.logprobs_mode} if params.logprobs is not None else {}


# ------------------------------------------------------------------------------ chat completions


async def chat_completions(request: Request) -> Any:
    rt = runtime(request)
    rt.ready()
    req = p.parse(p.ChatCompletionRequest, await read_json(request, rt.config.max_body_bytes))
    check_model(rt, req.model)
    p.check_unsupported(req)
    grammar = p.structured_output_spec(req)
    tools = p.tools_request(req)
    # before the tool grammar: enforce mode pins response_format's schema, never a tool grammar
    plan, grammar = plan_guard(rt.policy, rt.sessions, req.plumbline, grammar, req.messages,
                               tools if tools is not None and tools.is_active else None)
    if tools is not None and tools.is_active:
        if grammar is not None:
            raise p.BadRequest("tools and a structured output format both constrain the output; "
                               "send one (or tool_choice 'none')", "tools")
        try:
            grammar = tool_call_grammar(tools, rt.tokenizer)
        except GrammarError as exc:
            raise p.NotSupported(f"tool calls cannot be served with this model: {exc}",
                                 "tools") from None
    else:
        tools = None
    if req.top_logprobs is not None and not req.logprobs:
        raise p.BadRequest("top_logprobs needs logprobs set to true", "top_logprobs")
    prompt_ids = render_chat(rt, req.messages, tools)
    params = p.sampling_params(
        req, max_tokens=req.max_completion_tokens or req.max_tokens,
        num_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        default_max_tokens=rt.max_model_len - len(prompt_ids), grammar=grammar)
    return await respond(request, rt, req, "chatcmpl", prompt_ids, params, ChatFormatter,
                         plan, tools=tools)


def render_chat(rt: Runtime, messages: list[p.ChatMessage], tools: ToolsRequest | None) -> list[int]:
    """The prompt: messages (with earlier tool calls and results) and the tools, through the
    model's chat template, or our own tool section when the template knows no tools."""
    tokenizer = rt.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise p.NotSupported("this model has no chat template; use /v1/completions", "messages")
    conversation = []
    for i, m in enumerate(messages):
        text = m.text()
        p.check_text(text, f"messages[{i}].content")
        message: dict[str, Any] = {"role": m.role, "content": text}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            for j, call in enumerate(m.tool_calls):
                p.check_text(call.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        conversation.append(message)
    try:
        prompt = render_prompt(tokenizer, conversation, tools)
    except Exception as exc:  # a template may refuse a conversation (e.g. role order)
        raise p.BadRequest(f"the chat template rejected these messages: {exc}", "messages") from None
    return list(tokenizer(prompt, add_special_tokens=False).input_ids)


class _Formatter:
    """What both formatters share: the generation, the request and the chunk header."""

    def __init__(self, rt: Runtime, gen: Generation, req: Any, object_name: str) -> None:
        self.gen = gen
        self.req = req
        assert rt.token_table is not None
        self.tokens = rt.token_table
        self.base = {"id": gen.request_id, "object": object_name,
                     "created": int(time.time()), "model": rt.config.model_name}
        self.want_token_ids = bool(req.return_token_ids)
        # token ids released per choice: all of them, and those not yet shown in a chunk
        self.token_ids: list[list[int]] = [[] for _ in range(gen.params.n)]
        self.pending_ids: list[list[int]] = [[] for _ in range(gen.params.n)]

    async def updates(self) -> AsyncGenerator[ChoiceUpdate, None]:
        """The generation's updates, with the token ids they release recorded on the way (a
        chunk may be skipped, e.g. half a character, but its tokens ride on the next one)."""
        async with aclosing(self.gen.updates()) as updates:
            async for u in updates:
                self.token_ids[u.index] += u.token_ids
                self.pending_ids[u.index] += u.token_ids
                yield u

    def _ids(self, u: ChoiceUpdate, is_first: bool = True) -> dict[str, Any]:
        """A stream chunk's per-choice fields for the tokens it is the first to show: their ids
        (with return_token_ids) and the weights version(s) they were sampled with."""
        ids = self.pending_ids[u.index]
        if not is_first or not ids:
            return {}
        self.pending_ids[u.index] = []
        end = len(self.token_ids[u.index]) - len(self.pending_ids[u.index])
        versions = self.gen.weights_versions[u.index][end - len(ids):end]
        out: dict[str, Any] = {"token_ids": ids} if self.want_token_ids else {}
        if self.want_token_ids and self.base["object"] == "text_completion" and end == len(ids):
            out["prompt_token_ids"] = list(self.gen.prompt_ids)    # vLLM: on the choice, once
        if versions:
            out["plumbline"] = _versions([versions])
        return out

    def _choice_fields(self, u: ChoiceUpdate, is_first: bool, is_last: bool) -> dict[str, Any]:
        """_ids, and on a choice's last chunk the incomplete marker."""
        out = self._ids(u, is_first)
        if is_last and self._is_incomplete(u.finish_reason):
            out["plumbline"] = {**out.get("plumbline", {}), "incomplete": True}
        return out

    def _is_incomplete(self, finish_reason: str | None) -> bool:
        """max_tokens cut a constrained output before its grammar could end: the structure
        (JSON value, tool call, ...) is unfinished; the response says so."""
        return finish_reason == "length" and self.gen.params.grammar is not None

    async def collect(self) -> dict[str, Any]:
        """The whole response as one JSON body (each formatter has its own)."""
        raise NotImplementedError

    async def body(self) -> dict[str, Any]:
        """The non-streaming response: `collect`, plus token ids and weights versions."""
        out: dict[str, Any] = await self.collect()
        is_chat = out["object"] == "chat.completion"
        if self.want_token_ids and is_chat:   # vLLM's places: the chat response's top level,
            out["prompt_token_ids"] = list(self.gen.prompt_ids)    # each completion choice
        for choice in out["choices"]:
            if self.want_token_ids:
                if not is_chat:
                    choice["prompt_token_ids"] = list(self.gen.prompt_ids)
                choice["token_ids"] = self.token_ids[choice["index"]]
            if self._is_incomplete(choice["finish_reason"]):
                choice["plumbline"] = {"incomplete": True}
        versions = [v[:len(ids)] for v, ids in zip(self.gen.weights_versions, self.token_ids)]
        if any(versions):
            out.setdefault("plumbline", {}).update(_versions(versions))
        return out


def _versions(per_choice: list[list[int]]) -> dict[str, Any]:
    """`weights_version`: the newest version the tokens were sampled with; `weights_versions`
    (one list per choice, one entry per token) only when the weights changed mid-way."""
    seen = {v for vs in per_choice for v in vs}
    out: dict[str, Any] = {"weights_version": max(seen)}
    if len(seen) > 1:
        out["weights_versions"] = per_choice
    return out


class ChatFormatter(_Formatter):
    def __init__(self, rt: Runtime, gen: Generation, req: p.ChatCompletionRequest) -> None:
        super().__init__(rt, gen, req, "chat.completion.chunk")
        self.want_logprobs = gen.params.logprobs is not None

    def _logprobs(self, u: ChoiceUpdate) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        return {"content": [self.tokens.chat_entry(t, lp, top) for t, lp, top
                            in zip(u.token_ids, u.logprobs, u.top_logprobs)]}

    async def events(self) -> AsyncGenerator[bytes, None]:
        extra = {"usage": None} if self.req.include_usage else {}
        yield frame({**self.base, "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None} for i in range(self.gen.params.n)], **extra,
            **({"prompt_token_ids": list(self.gen.prompt_ids)} if self.want_token_ids else {})})
        async with aclosing(self.updates()) as updates:
            async for u in updates:
                if (not u.text and not u.tool_calls and u.finish_reason is None
                        and not u.violations and not (self.want_logprobs and u.token_ids)):
                    continue          # e.g. half a character held back
                # One chunk per call delta, as OpenAI streams them; logprobs ride on the first
                # chunk of the update, finish_reason and the guard's news on the last.
                deltas: list[dict[str, Any]] = [{"content": u.text}] if u.text else []
                deltas += [{"tool_calls": [c.to_openai()]} for c in u.tool_calls]
                deltas = deltas or [{}]
                for k, delta in enumerate(deltas):
                    last = k == len(deltas) - 1
                    yield frame({**self.base, "choices": [
                        {"index": u.index, "delta": delta, **self._choice_fields(u, k == 0, last),
                         "logprobs": self._logprobs(u) if k == 0 else None,
                         "finish_reason": u.finish_reason if last else None}], **extra,
                        **(_guard_news(u) if last else {})})
        if self.req.include_usage:
            yield frame({**self.base, "choices": [], "usage": usage(self.gen),
                         **_ext(self.gen.params)})
        yield DONE

    async def collect(self) -> dict[str, Any]:
        n = self.gen.params.n
        texts, reasons = [""] * n, [None] * n  # type: list[str], list[str | None]
        entries: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        calls: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        verdicts: list[dict[str, Any] | None] = [None] * n
        async with aclosing(self.updates()) as updates:
            async for u in updates:
                texts[u.index] += u.text
                reasons[u.index] = u.finish_reason or reasons[u.index]
                verdicts[u.index] = u.checks or verdicts[u.index]
                lp = self._logprobs(u)
                if lp is not None:
                    entries[u.index] += lp["content"]
                for c in u.tool_calls:    # the stream's deltas, summed: the same calls
                    if c.id is not None:
                        calls[u.index].append(c.to_openai())
                        del calls[u.index][-1]["index"]
                    else:
                        calls[u.index][-1]["function"]["arguments"] += c.arguments
        for i in range(n):
            if reasons[i] == "content_filter":    # withheld whole: nothing of it was sent
                texts[i], calls[i], entries[i] = "", [], []
        return {"id": self.gen.request_id, "object": "chat.completion",
                "created": self.base["created"], "model": self.base["model"],
                "choices": [{"index": i, "message": _message(texts[i], calls[i],
                                                             reasons[i] == "content_filter"),
                             "logprobs": {"content": entries[i]} if self.want_logprobs else None,
                             "finish_reason": reasons[i]} for i in range(n)],
                "usage": usage(self.gen), **_ext(self.gen.params, verdicts)}


def _message(text: str, calls: list[dict[str, Any]], is_withheld: bool = False) -> dict[str, Any]:
    if is_withheld:
        return {"role": "assistant", "content": None}
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


def _ext(params: SamplingParams,
         verdicts: Sequence[dict[str, Any] | None] = ()) -> dict[str, Any]:
    """The response's `plumbline` object; `checks` holds the guard's verdict (one per choice,
    a list, when n > 1)."""
    ext = plumbline_extension(params)
    if any(v is not None for v in verdicts):
        ext["checks"] = verdicts[0] if len(verdicts) == 1 else list(verdicts)
    return {"plumbline": ext} if ext else {}


def _guard_news(u: ChoiceUpdate) -> dict[str, Any]:
    """A chunk's `plumbline`: violations found since the last chunk; the verdict at the end."""
    news: dict[str, Any] = {}
    if u.violations:
        news["violations"] = list(u.violations)
    if u.checks is not None:
        news["checks"] = u.checks
    return {"plumbline": news} if news else {}


# ------------------------------------------------------------------------------- completions


async def completions(request: Request) -> Any:
    rt = runtime(request)
    rt.ready()
    req = p.parse(p.CompletionRequest, await read_json(request, rt.config.max_body_bytes))
    check_model(rt, req.model)
    p.check_unsupported(req)
    grammar = p.structured_output_spec(req)
    plan, grammar = plan_guard(rt.policy, rt.sessions, req.plumbline, grammar)
    prompt_ids = tokenize_prompt(rt, req.prompt)
    params = p.sampling_params(req, max_tokens=req.max_tokens, num_logprobs=req.logprobs,
                               default_max_tokens=16,   # OpenAI's default for completions
                               num_prompt_logprobs=req.logprobs if req.echo else None,
                               grammar=grammar)
    return await respond(request, rt, req, "cmpl", prompt_ids, params, CompletionFormatter, plan)


def tokenize_prompt(rt: Runtime, prompt: str | list[str] | list[int] | list[list[int]]) -> list[int]:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise p.NotSupported("a list of several prompts is not supported yet; send one "
                                 "request per prompt", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        p.check_text(prompt, "prompt")
        return list(rt.tokenizer(prompt).input_ids)
    return list(prompt)        # type: ignore[arg-type]


class CompletionFormatter(_Formatter):
    def __init__(self, rt: Runtime, gen: Generation, req: p.CompletionRequest) -> None:
        super().__init__(rt, gen, req, "text_completion")
        self.echo = (rt.tokenizer.decode(list(gen.prompt_ids), skip_special_tokens=True)
                     if req.echo else "")
        self.want_logprobs = gen.params.logprobs is not None

    def _logprobs(self, u: ChoiceUpdate, offset: int) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        return self.tokens.completion_logprobs(u.token_ids, u.logprobs, u.top_logprobs, offset)

    def _echo_logprobs(self) -> dict[str, Any] | None:
        """The prompt's logprobs; they come with the first delta, so call after it."""
        if not (self.echo and self.want_logprobs):
            return None
        entries = self.gen.prompt_logprobs or ()
        return self.tokens.prompt_logprobs(self.gen.prompt_ids, entries)

    async def events(self) -> AsyncGenerator[bytes, None]:
        extra = {"usage": None} if self.req.include_usage else {}
        n = self.gen.params.n
        offsets = [len(self.echo)] * n
        echoed = not self.echo
        async with aclosing(self.updates()) as updates:
            async for u in updates:
                if not echoed:    # after the first delta: it carries the prompt's logprobs
                    echoed = True
                    yield frame({**self.base, "choices": [
                        {"index": i, "text": self.echo, "logprobs": self._echo_logprobs(),
                         "finish_reason": None} for i in range(n)], **extra})
                if (not u.text and u.finish_reason is None and not u.violations
                        and not (self.want_logprobs and u.token_ids)):
                    continue
                lp = self._logprobs(u, offsets[u.index])
                offsets[u.index] += len(u.text)
                yield frame({**self.base, "choices": [
                    {"index": u.index, "text": u.text, "logprobs": lp, **self._choice_fields(u, True, True),
                     "finish_reason": u.finish_reason}], **extra, **_guard_news(u)})
        if self.req.include_usage:
            yield frame({**self.base, "choices": [], "usage": usage(self.gen),
                         **_ext(self.gen.params)})
        yield DONE

    async def collect(self) -> dict[str, Any]:
        n = self.gen.params.n
        texts, reasons = [self.echo] * n, [None] * n  # type: list[str], list[str | None]
        lps: list[dict[str, list[Any]]] = [
            {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for _ in range(n)]
        verdicts: list[dict[str, Any] | None] = [None] * n
        async with aclosing(self.updates()) as updates:
            async for u in updates:
                lp = self._logprobs(u, len(texts[u.index]))
                texts[u.index] += u.text
                reasons[u.index] = u.finish_reason or reasons[u.index]
                verdicts[u.index] = u.checks or verdicts[u.index]
                if lp is not None:
                    for key in lps[u.index]:
                        lps[u.index][key] += lp[key]
        for i in range(n):
            if reasons[i] == "content_filter":    # withheld whole: nothing of it was sent
                texts[i] = self.echo
                lps[i] = {key: [] for key in lps[i]}
        echo_lp = self._echo_logprobs()
        if echo_lp is not None:
            for lp in lps:
                for key in lp:
                    lp[key] = echo_lp[key] + lp[key]
        return {**self.base, "choices": [
            {"index": i, "text": texts[i], "logprobs": lps[i] if self.want_logprobs else None,
             "finish_reason": reasons[i]} for i in range(n)],
            "usage": usage(self.gen), **_ext(self.gen.params, verdicts)}
