"""The legacy completions shape (`text_completion`): bodies and chunks from one prompt's
`Generation` or several prompts' `GenerationGroup` (prompt i's sample j is choice i * n + j),
with echo, the prompt's logprobs and best_of."""
from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from engine.types import PromptLogprob
from gateway.generation import ChoiceUpdate, Generation
from gateway.generation_group import GenerationGroup
from gateway.protocol import CompletionRequest
from gateway.responses import Formatter, _guard_news, _logprobs_mode, plumbline_extension, usage
from gateway.sse import DONE, frame
from gateway.state import Runtime


class CompletionFormatter(Formatter):
    def __init__(self, rt: Runtime, gen: Generation | GenerationGroup,
                 req: CompletionRequest) -> None:
        super().__init__(rt, gen, req, "text_completion")
        per = gen.n_per_prompt
        # echo: each prompt's text, ahead of each of its choices
        self.echo = [rt.tokenizer.decode(list(gen.prompt_ids_of(i)), skip_special_tokens=True)
                     if req.echo else "" for i in range(0, gen.params.n, per)]
        self.want_logprobs = gen.params.logprobs is not None

    def _echo_of(self, index: int) -> str:
        return self.echo[index // self.gen.n_per_prompt]

    def _logprobs(self, u: ChoiceUpdate, offset: int) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        return self.tokens.completion_logprobs(u.token_ids, u.logprobs, u.top_logprobs, offset)

    def _echo_logprobs(self, index: int) -> dict[str, Any] | None:
        """The prompt's logprobs; they come with its first delta, so call after it."""
        if not (self._echo_of(index) and self.want_logprobs):
            return None
        k = self.gen.params.logprobs or 0      # prompt_logprobs may have asked for more
        entries = [e if e is None else PromptLogprob(e.logprob, e.top[:k], e.rank)
                   for e in self.gen.prompt_logprobs_of(index) or ()]
        return self.tokens.prompt_logprobs(self.gen.prompt_ids_of(index), entries)

    async def events(self) -> AsyncGenerator[bytes, None]:
        extra = {"usage": None} if self.req.include_usage else {}
        n, per = self.gen.params.n, self.gen.n_per_prompt
        offsets = [len(self._echo_of(i)) for i in range(n)]
        echoed = [not e for e in self.echo]                 # per prompt
        async with aclosing(self.updates()) as updates:
            async for u in updates:
                prompt = u.index // per
                if not echoed[prompt]:   # after its first delta: it carries the prompt's logprobs
                    echoed[prompt] = True
                    yield frame({**self.base, "choices": [
                        {"index": i, "text": self.echo[prompt], "logprobs": self._echo_logprobs(i),
                         "finish_reason": None} for i in range(prompt * per, (prompt + 1) * per)],
                        **self._usage_now(extra)})
                if (not u.text and u.finish_reason is None and not u.violations
                        and not (self.want_logprobs and u.token_ids)):
                    continue
                lp = self._logprobs(u, offsets[u.index])
                offsets[u.index] += len(u.text)
                yield frame({**self.base, "choices": [
                    {"index": u.index, "text": u.text, "logprobs": lp,
                     **self._choice_fields(u, True, True), "finish_reason": u.finish_reason}],
                    **self._usage_now(extra), **_guard_news(u)})
        if self.req.include_usage:
            yield frame({**self.base, "choices": [], "usage": usage(self.gen),
                         **plumbline_extension(logprobs_mode=_logprobs_mode(self.gen.params))})
        yield DONE

    async def collect(self) -> dict[str, Any]:
        n = self.gen.params.n
        texts = [self._echo_of(i) for i in range(n)]
        reasons: list[str | None] = [None] * n
        lps: list[dict[str, list[Any]]] = [
            {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for _ in range(n)]
        async with aclosing(self.updates()) as updates:
            async for u in updates:
                lp = self._logprobs(u, len(texts[u.index]))
                texts[u.index] += u.text
                reasons[u.index] = u.finish_reason or reasons[u.index]
                if lp is not None:
                    for key in lps[u.index]:
                        lps[u.index][key] += lp[key]
        for i in range(n):
            if reasons[i] == "content_filter":    # withheld whole: nothing of it was sent
                texts[i] = self._echo_of(i)
                lps[i] = {key: [] for key in lps[i]}
            echo_lp = self._echo_logprobs(i)
            if echo_lp is not None:
                for key in lps[i]:
                    lps[i][key] = echo_lp[key] + lps[i][key]
        return {**self.base, "choices": [
            {"index": i, "text": texts[i], "logprobs": lps[i] if self.want_logprobs else None,
             "finish_reason": reasons[i]} for i in range(n)],
            "usage": usage(self.gen)}
