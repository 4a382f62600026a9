"""Request fields the typed models do not declare: what plumbline does with each.

OpenAI's clients keep adding request fields, and vLLM's clients send its extras; a server that
refuses every name it does not know breaks real clients on their next release. So the top level
of a request body allows extra fields, and `judge_fields` sorts them:

- IGNORED: in OpenAI's or vLLM's API, accepted and ignored. Each is a hint, an optimisation or
  bookkeeping: ignoring it never changes what the output means.
- REFUSED: in OpenAI's or vLLM's API, and honouring it would change the output; a 400 naming it
  unless it carries a neutral value (its default), never served as if it were absent.
- anything else: in neither API. Ignored with a warning (`request_fields_ignored`) and an
  `x-plumbline-ignored` response header, as vLLM does, or a 400 with --strict-fields.

The README's field table says the same, field by field; keep them together.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from gateway.protocol import (BadRequest, ChatCompletionRequest, CompletionRequest,
                              DetokenizeRequest, NotSupported, TokenizeChatRequest,
                              TokenizeCompletionRequest)

# name -> why ignoring it is harmless (both generation endpoints)
IGNORED: dict[str, str] = {
    "reasoning_effort": "the served models have no reasoning mode to tune",
    "verbosity": "a length hint; max_tokens bounds the length",
    "prediction": "predicted outputs only speed decoding up; the output is the same without",
    "prompt_cache_key": "the prefix cache is keyed by the prompt's tokens",
    "prompt_cache_retention": "the prefix cache keeps blocks while memory allows",
    "safety_identifier": "bookkeeping",
    "request_id": "the X-Request-Id header names a request",
    "mm_processor_kwargs": "no multimodal inputs are served",
    "kv_transfer_params": "no disaggregated prefill",
    "length_penalty": "used by beam search only",
}

_NONE: tuple[Any, ...] = (None, {}, [])
# name -> (the neutral values, what a 400 says); a neutral value is accepted and ignored
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "functions": (_NONE, "the deprecated 'functions' is not supported; send 'tools'"),
    "function_call": (_NONE, "the deprecated 'function_call' is not supported; send "
                             "'tool_choice'"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "audio": (_NONE, "audio output is not supported"),
    "web_search_options": (_NONE, "web search is not supported"),
    "chat_template": ((None, ""), "a per-request chat template is not supported"),
    "documents": (_NONE, "documents for the chat template are not supported"),
    "use_beam_search": ((None, False), "beam search is not supported"),
    "logits_processors": (_NONE, "logits_processors is not supported"),
    "return_tokens_as_token_ids": ((None, False), "return_tokens_as_token_ids is not supported; "
                                                  "return_token_ids gives the ids"),
    "spaces_between_special_tokens": ((None, True), "spaces_between_special_tokens must be true"),
    "cache_salt": ((None,), "the prefix cache is shared by all requests; cache_salt is not "
                            "supported"),
}

# A field of the other generation endpoint would change the output here too: refused, not
# ignored (response_format on /v1/completions must never be served unconstrained).
_CHAT_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    name: ((None,), f"{name} is a chat completions field; /v1/completions does not take it")
    for name in ("messages", "response_format", "tools", "tool_choice", "parallel_tool_calls",
                 "max_completion_tokens", "top_logprobs", "add_generation_prompt")}
# vLLM's add_special_tokens (BOS and the like): our default is vLLM's for each endpoint
_CHAT_ONLY["add_special_tokens"] = ((None, True), "add_special_tokens false is not supported yet")
_CHAT_ONLY["chat_template_kwargs"] = (_NONE, "chat_template_kwargs is a chat completions field")
_CHAT_ONLY["continue_final_message"] = ((None, False), "continue_final_message is a chat "
                                                       "completions field")
_COMPLETIONS_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "prompt": ((None,), "prompt is a completions field; send messages"),
    "suffix": ((None,), "suffix is not supported"),
    "best_of": ((None, 1), "best_of is not supported on chat completions"),
    "echo": ((None, False), "echo is not supported on chat completions"),
    "add_special_tokens": ((None, False), "add_special_tokens true is not supported on chat "
                                          "completions yet (the template writes its own)"),
}
_TOKENIZE: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": (_NONE, "tools are not supported on /tokenize yet"),
    "chat_template": REFUSED["chat_template"],
    "documents": REFUSED["documents"],
    "mm_processor_kwargs": ((None, {}), "no multimodal inputs are served"),
}

_POLICY: dict[type[BaseModel], tuple[set[str], dict[str, tuple[tuple[Any, ...], str]]]] = {
    ChatCompletionRequest: (set(IGNORED), {**REFUSED, **_COMPLETIONS_ONLY}),
    CompletionRequest: (set(IGNORED), {**REFUSED, **_CHAT_ONLY}),
    TokenizeCompletionRequest: (set(), _TOKENIZE),
    TokenizeChatRequest: (set(), _TOKENIZE),
    DetokenizeRequest: (set(), {}),
}


def judge_fields(req: BaseModel, *, strict: bool) -> list[str]:
    """The unknown top-level fields of a parsed request, to ignore with a warning; a refused
    field (or, when strict, an unknown one) is a 400 naming it."""
    ignored, refused = _POLICY[type(req)]
    unknown = []
    for name, value in (req.model_extra or {}).items():
        if name in ignored:
            continue
        if name in refused:
            neutral, why = refused[name]
            if not any(value == v and type(value) is type(v) for v in neutral):
                raise NotSupported(why, name)
            continue
        if strict:
            raise BadRequest(f"unknown field '{name}'", name, code="unknown_field")
        unknown.append(name)
    return unknown
