"""`LLM`: the blocking offline wrapper. It drives the same core as the server, step by step."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from engine.config import DEFAULT_MODEL, EngineConfig
from engine.engine import EngineCore
from engine.types import CompletionOutput, FinishReason, GenerateRequest, RequestOutput, SamplingParams

_counter = itertools.count()


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **config: Any) -> None:
        self.core = EngineCore(EngineConfig(model=model, **config))
        self.tokenizer = self.core.tokenizer

    def generate(self, prompts: Seq[str] | Seq[Seq[int]] | str,
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Prompts are strings (tokenized as-is, no chat template) or token-id lists."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        assert len(params) == len(prompts), "one SamplingParams per prompt"
        outputs: dict[str, RequestOutput] = {}
        for prompt, p in zip(prompts, params):
            ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
            request_id = f"offline-{next(_counter)}"
            self.core.add_request(GenerateRequest(request_id, tuple(ids), p))
            outputs[request_id] = RequestOutput(request_id, ids, [
                CompletionOutput(i, [], [], [], "", None) for i in range(p.n)])
        params_by_id = dict(zip(outputs, params))
        while self.core.has_work():
            for delta in self.core.step():
                ro = outputs[delta.request_id]
                out = ro.outputs[delta.index]
                if out.finish_reason is not None:
                    continue              # already ended on a stop string; siblings go on
                out.token_ids += delta.token_ids
                out.logprobs += delta.logprobs
                out.top_logprobs += delta.top_logprobs
                out.weights_versions += delta.weights_versions
                if delta.prompt_logprobs is not None and ro.prompt_logprobs is None:
                    ro.prompt_logprobs = list(delta.prompt_logprobs)
                if delta.finish_reason is not None:
                    out.finish_reason = _finish_name(delta.finish_reason)
                elif params_by_id[delta.request_id].stop and self._hit_stop(
                        out, params_by_id[delta.request_id].stop):
                    out.finish_reason = "stop"
                    if all(o.finish_reason for o in ro.outputs):
                        self.core.abort(delta.request_id)
        for request_id, ro in outputs.items():
            p = params_by_id[request_id]
            for out in ro.outputs:
                out.text = self._text(out, p)
        return list(outputs.values())

    def update_weights(self, state_dict: dict[str, Any]) -> int:
        """Swap in new weights (same architecture) between generate calls; returns the version."""
        return self.core.runner.load_weights(state_dict)

    def _hit_stop(self, out: CompletionOutput, stop: tuple[str, ...]) -> bool:
        text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return any(s in text for s in stop)

    def _text(self, out: CompletionOutput, p: SamplingParams) -> str:
        text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        hits = [(text.find(s), s) for s in p.stop if s in text]
        if hits:
            at, s = min(hits)
            text = text[:at + (len(s) if p.include_stop_str_in_output else 0)]
        return text


def _finish_name(reason: FinishReason) -> str:
    return "stop" if reason is FinishReason.STOP else reason.value
