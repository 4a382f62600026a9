"""Response shaping: chat and completion bodies and chunks, streamed and collected, from one
generation's updates; and the one builder of the `plumbline` extension they carry."""
from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

from engine import SamplingParams
from engine.types import PromptLogprob
from gateway.generation import ChoiceUpdate, Generation
from gateway.generation_group import GenerationGroup
from gateway.protocol import ChatCompletionRequest, logprob_value
from gateway.sse import DONE, frame
from gateway.state import Runtime
from gateway.tokens import TokenTable

Verdict = dict[str, Any]    # the guard's verdict on one choice (`Guard.verdict()`)


def usage(gen: Generation | GenerationGroup, so_far: bool = False) -> dict[str, Any]:
    """The usage object; `so_far` counts the completion tokens generated until now (vLLM's
    continuous_usage_stats) rather than the final count."""
    o = gen.outcome
    num_completion = gen.num_completion_tokens if so_far else o.num_completion_tokens
    return {"prompt_tokens": o.num_prompt_tokens, "completion_tokens": num_completion,
            "total_tokens": o.num_prompt_tokens + num_completion,
            "prompt_tokens_details": {"cached_tokens": o.num_cached_tokens}}


def plumbline_extension(*, logprobs_mode: str | None = None,
                        violations: Sequence[dict[str, Any]] = (),
                        checks: Verdict | list[Verdict | None] | None = None,
                        weights_versions: Sequence[list[int]] | None = None,
                        incomplete: bool = False, closed_early: bool = False) -> dict[str, Any]:
    """`{"plumbline": {...}}` for a body, a chunk or a choice, or `{}` when there is nothing to
    say. Its fields, each only when it applies: `logprobs_mode` (logprobs were asked for);
    `violations` (found since the last chunk); `checks` (the guard's verdict, a list when
    n > 1); `weights_version`, the newest version the tokens were sampled with, and
    `weights_versions` (one list per choice, one entry per token) only when the weights changed
    mid-way; `incomplete` (max_tokens cut a constrained output before its grammar could end);
    `closed_early` (budget-aware closing narrowed the choice's masks to close its structure)."""
    ext: dict[str, Any] = {}
    if logprobs_mode is not None:
        ext["logprobs_mode"] = logprobs_mode
    if violations:
        ext["violations"] = list(violations)
    if checks is not None:
        ext["checks"] = checks
    seen = {v for vs in weights_versions or () for v in vs}
    if seen:
        ext["weights_version"] = max(seen)
        if len(seen) > 1:
            ext["weights_versions"] = weights_versions
    if incomplete:
        ext["incomplete"] = True
    if closed_early:
        ext["closed_early"] = True
    return {"plumbline": ext} if ext else {}


def vllm_prompt_logprobs(tokens: TokenTable, prompt_ids: Sequence[int],
                         entries: Sequence[PromptLogprob | None] | None,
                         k: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's prompt_logprobs: None for the first token, then per token a dict from token id to
    {logprob, rank, decoded_token}: the prompt's own token and the top-k alternatives (raw
    logprobs: the model's distribution, as the prompt was not sampled)."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for token_id, entry in zip(prompt_ids[1:], list(entries or ())[1:]):
        assert entry is not None
        top = entry.top[:k]
        row = {str(token_id): {"logprob": logprob_value(entry.logprob), "rank": entry.rank,
                               "decoded_token": tokens.get(token_id)[0]}}
        for j, t in enumerate(top, 1):
            row.setdefault(str(t.token_id), {"logprob": logprob_value(t.logprob), "rank": j,
                                             "decoded_token": tokens.get(t.token_id)[0]})
        out.append(row)
    return out


def _logprobs_mode(params: SamplingParams) -> str | None:
    return params.logprobs_mode if params.logprobs is not None else None


def _checks(verdicts: Sequence[Verdict | None]) -> Verdict | list[Verdict | None] | None:
    """The body's `checks`: the one choice's verdict, or a list when n > 1; None without any."""
    if not any(v is not None for v in verdicts):
        return None
    return verdicts[0] if len(verdicts) == 1 else list(verdicts)


class Formatter:
    """What both formatters share: the generation, the request and the chunk header."""

    def __init__(self, rt: Runtime, gen: Generation | GenerationGroup, req: Any,
                 object_name: str) -> None:
        self.gen = gen
        self.req = req
        options = req.stream_options
        self.continuous_usage = bool(options is not None and options.include_usage
                                     and options.continuous_usage_stats)
        assert rt.token_table is not None
        self.tokens = rt.token_table
        self.base = {"id": gen.request_id, "object": object_name,
                     "created": int(time.time()), "model": rt.config.model_name}
        self.want_token_ids = bool(req.return_token_ids)
        # token ids released per choice: all of them, and those not yet shown in a chunk
        self.token_ids: list[list[int]] = [[] for _ in range(gen.params.n)]
        self.pending_ids: list[list[int]] = [[] for _ in range(gen.params.n)]
        self.verdicts: list[Verdict | None] = [None] * gen.params.n   # the guard's, per choice
        self.closed_early = [False] * gen.params.n
        self.cut = [False] * gen.params.n          # ended inside a tool call
        self.cum_logprobs = [0.0] * gen.params.n    # best_of keeps the n highest per prompt

    async def updates(self) -> AsyncGenerator[ChoiceUpdate, None]:
        """The generation's updates, with the token ids they release and the guard's verdicts
        recorded on the way (a chunk may be skipped, e.g. half a character, but its tokens ride
        on the next one)."""
        async with aclosing(self.gen.updates()) as updates:
            async for u in updates:
                self.token_ids[u.index] += u.token_ids
                self.pending_ids[u.index] += u.token_ids
                self.verdicts[u.index] = u.checks or self.verdicts[u.index]
                self.closed_early[u.index] |= u.closed_early
                self.cut[u.index] |= u.incomplete
                if self.req_n < self.gen.n_per_prompt:          # best_of: ranked at the end
                    self.cum_logprobs[u.index] += sum(u.logprobs)
                yield u

    def _usage_now(self, extra: dict[str, Any]) -> dict[str, Any]:
        """A chunk's `usage`: null with include_usage, or the counts so far when
        continuous_usage_stats asks (vLLM's: every chunk)."""
        return {"usage": usage(self.gen, so_far=True)} if self.continuous_usage else extra

    def _choice_fields(self, u: ChoiceUpdate, is_first: bool, is_last: bool) -> dict[str, Any]:
        """A stream chunk's per-choice fields. For the tokens it is the first to show: their ids
        (with return_token_ids) and the weights version(s) they were sampled with; on a choice's
        last chunk, the incomplete marker."""
        out: dict[str, Any] = {}
        versions: list[int] = []
        ids = self.pending_ids[u.index]
        if is_first and ids:
            self.pending_ids[u.index] = []
            end = len(self.token_ids[u.index])
            versions = self.gen.weights_versions[u.index][end - len(ids):end]
            if self.want_token_ids:
                out["token_ids"] = ids
                if self.base["object"] == "text_completion" and end == len(ids):
                    out["prompt_token_ids"] = list(self.gen.prompt_ids_of(u.index))  # vLLM: once
        out.update(plumbline_extension(
            weights_versions=[versions] if versions else None,
            incomplete=is_last and self._is_incomplete(u.index, u.finish_reason),
            closed_early=is_last and u.finish_reason is not None and self.closed_early[u.index]))
        return out

    def _is_incomplete(self, index: int, finish_reason: str | None) -> bool:
        """max_tokens cut a constrained output before its grammar could end, or a stop string
        cut a tool call: the structure (JSON value, tool call, ...) is unfinished; the
        response says so."""
        return self.cut[index] or (finish_reason == "length" and self.gen.params.grammar is not None)

    def events(self) -> AsyncGenerator[bytes, None]:
        """The streamed response as SSE frames (each formatter has its own)."""
        raise NotImplementedError

    async def collect(self) -> dict[str, Any]:
        """The whole response as one JSON body (each formatter has its own)."""
        raise NotImplementedError

    async def body(self) -> dict[str, Any]:
        """The non-streaming response: `collect`, plus token ids and weights versions."""
        out: dict[str, Any] = await self.collect()
        is_chat = out["object"] == "chat.completion"
        if self.want_token_ids and is_chat:   # vLLM's places: the chat response's top level,
            out["prompt_token_ids"] = list(self.gen.prompt_ids)    # each completion choice
        k = self.req.prompt_logprobs
        if k is not None and is_chat:            # vLLM's places: the chat response's top level,
            out["prompt_logprobs"] = vllm_prompt_logprobs(      # each completion choice
                self.tokens, self.gen.prompt_ids_of(0), self.gen.prompt_logprobs_of(0), k)
        for choice in out["choices"]:
            if k is not None and not is_chat:
                i = choice["index"]
                choice["prompt_logprobs"] = vllm_prompt_logprobs(
                    self.tokens, self.gen.prompt_ids_of(i), self.gen.prompt_logprobs_of(i), k)
            if self.want_token_ids:
                if not is_chat:
                    choice["prompt_token_ids"] = list(self.gen.prompt_ids_of(choice["index"]))
                choice["token_ids"] = self.token_ids[choice["index"]]
            choice.update(plumbline_extension(
                incomplete=self._is_incomplete(choice["index"], choice["finish_reason"]),
                closed_early=self.closed_early[choice["index"]]))
        versions = [v[:len(ids)] for v, ids in zip(self.gen.weights_versions, self.token_ids)]
        out.update(plumbline_extension(logprobs_mode=_logprobs_mode(self.gen.params),
                                       checks=_checks(self.verdicts), weights_versions=versions))
        if self.req_n < self.gen.n_per_prompt:
            out["choices"] = self._best(out["choices"])
        return out

    @property
    def req_n(self) -> int:
        return int(self.req.n)

    def _best(self, choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """best_of: of each prompt's samples, the n with the highest cumulative logprob (in the
        request's logprobs mode), best first, numbered prompt * n + rank."""
        per, n = self.gen.n_per_prompt, self.req_n
        out = []
        for start in range(0, len(choices), per):
            ranked = sorted(choices[start:start + per],
                            key=lambda c: -self.cum_logprobs[c["index"]])
            for rank, choice in enumerate(ranked[:n]):
                out.append({**choice, "index": start // per * n + rank})
        return out


class ChatFormatter(Formatter):
    def __init__(self, rt: Runtime, gen: Generation | GenerationGroup,
                 req: ChatCompletionRequest) -> None:
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
             "finish_reason": None} for i in range(self.gen.params.n)], **self._usage_now(extra),
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
                         "finish_reason": u.finish_reason if last else None}],
                        **self._usage_now(extra),
                        **(_guard_news(u) if last else {})})
        if self.req.include_usage:
            yield frame({**self.base, "choices": [], "usage": usage(self.gen),
                         **plumbline_extension(logprobs_mode=_logprobs_mode(self.gen.params))})
        yield DONE

    async def collect(self) -> dict[str, Any]:
        n = self.gen.params.n
        texts, reasons = [""] * n, [None] * n  # type: list[str], list[str | None]
        entries: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        calls: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        async with aclosing(self.updates()) as updates:
            async for u in updates:
                texts[u.index] += u.text
                reasons[u.index] = u.finish_reason or reasons[u.index]
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
                "usage": usage(self.gen)}


def _message(text: str, calls: list[dict[str, Any]], is_withheld: bool = False) -> dict[str, Any]:
    if is_withheld:
        return {"role": "assistant", "content": None}
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


def _guard_news(u: ChoiceUpdate) -> dict[str, Any]:
    """A chunk's `plumbline`: violations found since the last chunk; the verdict at the end."""
    return plumbline_extension(violations=u.violations, checks=u.checks)
