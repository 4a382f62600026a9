"""Several prompts of one `/v1/completions` request (a list of prompts or of token-id lists):
each prompt is a `Generation` of its own with n choices, run side by side; prompt i's choice j
is the response's choice i * n + j, as OpenAI numbers them. The group offers what a formatter
reads of a `Generation`, so one formatter serves one prompt or many."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from engine import SamplingParams
from engine.types import PromptLogprob
from gateway.generation import ChoiceUpdate, Generation, Outcome


class GenerationGroup:
    def __init__(self, gens: list[Generation]) -> None:
        assert gens
        self.gens = gens
        self.request_id = gens[0].request_id
        self.n_per_prompt = gens[0].params.n
        self.params: SamplingParams = replace(gens[0].params, n=self.n_per_prompt * len(gens))
        self.trace = None         # each prompt keeps its own trace

    def _gen(self, index: int) -> Generation:
        return self.gens[index // self.n_per_prompt]

    def prompt_ids_of(self, index: int) -> tuple[int, ...]:
        return self._gen(index).prompt_ids

    def prompt_logprobs_of(self, index: int) -> tuple[PromptLogprob | None, ...] | None:
        return self._gen(index).prompt_logprobs

    @property
    def weights_versions(self) -> list[list[int]]:
        return [v for g in self.gens for v in g.weights_versions]

    @property
    def num_completion_tokens(self) -> int:
        return sum(g.num_completion_tokens for g in self.gens)

    @property
    def outcome(self) -> Outcome:
        """The prompts' outcomes summed (usage counts every prompt)."""
        outs = [g.outcome for g in self.gens]
        ttfts = [o.ttft_s for o in outs if o.ttft_s is not None]
        queues = [o.queue_s for o in outs if o.queue_s is not None]
        return Outcome(sum(o.num_prompt_tokens for o in outs),
                       sum(o.num_completion_tokens for o in outs),
                       sum(o.num_cached_tokens for o in outs),
                       [r for o in outs for r in o.finish_reasons],
                       min(ttfts, default=None), max(queues, default=None))

    async def updates(self) -> AsyncGenerator[ChoiceUpdate, None]:
        """Every prompt's updates as they come, renumbered; leaving early closes them all (each
        aborts its engine request and releases its slot)."""
        queue: asyncio.Queue[ChoiceUpdate | BaseException | None] = asyncio.Queue()

        async def pump(offset: int, gen: Generation) -> None:
            try:
                async with aclosing(gen.updates()) as updates:
                    async for u in updates:
                        u.index += offset
                        queue.put_nowait(u)
            except Exception as exc:       # the consumer raises it, as for one prompt
                queue.put_nowait(exc)
            else:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(pump(i * self.n_per_prompt, g))
                 for i, g in enumerate(self.gens)]
        try:
            num_done = 0
            while num_done < len(tasks):
                item = await queue.get()
                if item is None:
                    num_done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        for g in self.gens:
            g.close()
