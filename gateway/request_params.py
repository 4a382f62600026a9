"""What a parsed request asks of the engine: its grammar, its tools and its sampling parameters.

Each mapping refuses what the engine cannot honour with a 400 naming the parameter, before the
response starts.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jsonschema  # type: ignore[import-untyped]
from pydantic import BaseModel

from engine import SamplingParams
from gateway.protocol import (BadRequest, ChatCompletionRequest, CompletionRequest,
                              JsonSchemaFormat, NotSupported)
from grammars import backend_name
from grammars.spec import GrammarError, GrammarSpec
from grammars.tools import ToolError, ToolsRequest, parse_tools_request

GenerationRequest = ChatCompletionRequest | CompletionRequest


# Fill-in-the-middle tokens (prefix, suffix, middle) of the model families that have them:
# StarCoder's and Qwen's. The prompt is built prefix-suffix-middle; the model writes the middle.
_FIM_TOKENS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
               ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))


def fim_prompt(tokenizer: Any, prompt: str, suffix: str) -> list[int]:
    """OpenAI's suffix: the prompt ids that ask the model for the text between prompt and
    suffix. Only a tokenizer with fill-in-the-middle tokens can say that; else a 400."""
    vocab = tokenizer.get_vocab()
    for names in _FIM_TOKENS:
        if all(name in vocab for name in names):
            pre, suf, mid = (vocab[name] for name in names)
            encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
            return [pre, *encode(prompt), suf, *encode(suffix), mid]
    raise NotSupported("suffix needs a model with fill-in-the-middle tokens (<fim_prefix>, "
                       "<fim_suffix>, <fim_middle>); this model's tokenizer has none", "suffix")


def prompt_logprobs_asked(req: GenerationRequest) -> int | None:
    """How many alternatives per prompt token the engine computes (None: no prompt logprobs):
    vLLM's prompt_logprobs, and on completions echo with logprobs, which shows the prompt's."""
    if req.prompt_logprobs is not None and req.stream:
        raise BadRequest("prompt_logprobs cannot be streamed", "prompt_logprobs")
    asked = [req.prompt_logprobs]
    if isinstance(req, CompletionRequest) and req.echo:
        asked.append(req.logprobs)
    counts = [k for k in asked if k is not None]
    return max(counts) if counts else None


def samples_per_prompt(req: CompletionRequest) -> int:
    """How many samples the engine draws per prompt: best_of, of which the n with the highest
    cumulative logprob are returned (OpenAI's), or n. Streaming cannot pick the best before
    the end: refused, as OpenAI does."""
    if req.best_of is None or req.best_of == req.n:
        return req.n
    if req.best_of < req.n:
        raise BadRequest(f"best_of ({req.best_of}) must be at least n ({req.n})", "best_of")
    if req.stream:
        raise BadRequest("best_of greater than n cannot be streamed", "best_of")
    return req.best_of


# Constrained decoding (response_format, structured_outputs, guided_*) is parsed, validated and
# turned into a GrammarSpec either way; while this is False the request is refused with a clear
# 400 instead of being served unconstrained. Flip it once the grammar issue is accepted.
STRUCTURED_OUTPUTS_ENABLED = True


def structured_output_spec(req: GenerationRequest) -> GrammarSpec | None:
    """Validate response_format / tools / tool_choice / structured_outputs / guided_*; return the
    grammar the output must match, or None when nothing constrains it.

    Tools are checked (and constrained) apart, by `tools_request`: a request asks for one or
    the other.
    """
    asked: list[tuple[str, GrammarSpec]] = []
    if isinstance(req, ChatCompletionRequest) and req.response_format is not None:
        if isinstance(req.response_format, JsonSchemaFormat):
            _check_schema(req.response_format.json_schema.schema_,
                          "response_format.json_schema.schema")
        spec = _grammar("response_format", GrammarSpec.from_response_format,
                        req.response_format.model_dump(by_alias=True, exclude_none=True))
        if spec is not None:
            asked.append(("response_format", spec))
    if req.structured_outputs is not None:
        so = req.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        spec = _grammar("structured_outputs", GrammarSpec.from_structured_outputs, so)
        if spec is None:
            raise BadRequest("structured_outputs takes one of json, regex, choice, grammar, "
                             "json_object", "structured_outputs")
        asked.append(("structured_outputs", spec))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                      ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        value = getattr(req, name)
        if value is not None:
            spec = _grammar(name, GrammarSpec.from_structured_outputs, {key: value})
            assert spec is not None
            asked.append((name, spec))
    if len(asked) > 1:
        raise BadRequest(f"{asked[0][0]} and {asked[1][0]} both constrain the output; send one",
                         asked[1][0])
    if not asked:
        return None
    if not STRUCTURED_OUTPUTS_ENABLED:
        raise NotSupported(f"{asked[0][0]} is not supported yet: constrained decoding is not "
                           "enabled in this server", asked[0][0])
    return asked[0][1]


def tools_request(req: ChatCompletionRequest) -> ToolsRequest | None:
    """The checked tools / tool_choice / parallel_tool_calls; None without tools. A bad one is a
    400 naming the parameter (grammars.tools does the checking, so offline use agrees)."""
    try:
        tools = parse_tools_request(
            None if req.tools is None else [t.model_dump(exclude_none=True) for t in req.tools],
            req.tool_choice.model_dump() if isinstance(req.tool_choice, BaseModel) else req.tool_choice,
            req.parallel_tool_calls)
    except ToolError as exc:
        raise BadRequest(str(exc), exc.param) from None
    for i, tool in enumerate(req.tools or []):
        _check_schema(tool.function.parameters, f"tools[{i}].function.parameters")
    return tools


def _grammar(param: str, build: Callable[[Any], GrammarSpec | None], value: Any) -> GrammarSpec | None:
    try:
        return build(value)
    except GrammarError as exc:
        raise BadRequest(f"{param}: {exc}", param) from None


def _check_schema(schema: dict[str, Any] | None, param: str) -> None:
    if schema is None:
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise BadRequest(f"{param} is not a valid JSON schema: {exc.message}", param) from None


def sampling_params(req: GenerationRequest, *, max_tokens: int | None, num_logprobs: int | None,
                    default_max_tokens: int,
                    num_prompt_logprobs: int | None = None,
                    grammar: GrammarSpec | None = None, tokenizer: Any = None,
                    n: int | None = None) -> SamplingParams:
    """SamplingParams for a validated request; a value the engine refuses is a 400 naming it."""
    stop, stop_ids = req.stop_strings, tuple(req.stop_token_ids or ())
    if grammar is not None and not grammar.free_text:
        # Stops apply outside constrained structures only, i.e. to free text (tools with
        # "auto"): an output a grammar constrains whole (JSON, calls) is never cut invalid.
        stop, stop_ids = (), ()
    fields: dict[str, Any] = {
        "max_tokens": max_tokens if max_tokens is not None else max(1, default_max_tokens),
        "n": req.n if n is None else n, "stop": stop, "ignore_eos": req.ignore_eos,
        "stop_token_ids": stop_ids,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "logprobs": num_logprobs, "logprobs_mode": req.resolved_logprobs_mode(),
        "prompt_logprobs": num_prompt_logprobs, "grammar": grammar_options(req, grammar),
        "close_reserve": None if req.plumbline is None else req.plumbline.close_reserve,
        "logit_bias": _logit_bias(req.logit_bias), "min_tokens": req.min_tokens,
        "allowed_token_ids": (None if req.allowed_token_ids is None
                              else tuple(req.allowed_token_ids)),
        "priority": req.priority,
        "bad_words_token_ids": bad_words_token_ids(req.bad_words or [], tokenizer),
        # any Python int is a valid seed; the engine wants 64 bits
        "seed": None if req.seed is None else req.seed & ((1 << 64) - 1),
    }
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            fields[name] = value
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        message = str(exc)
        raise BadRequest(message, message.split(" ", 1)[0]) from None


def grammar_options(req: GenerationRequest, grammar: GrammarSpec | None) -> GrammarSpec | None:
    """The grammar with the request's `plumbline.grammar_backend`; an unknown backend, or one
    not installed here, is a 400 naming the field (with a grammar to compile or without)."""
    name = None if req.plumbline is None else req.plumbline.grammar_backend
    if name is None:
        return grammar
    try:
        backend = backend_name(name)
    except GrammarError as exc:
        raise BadRequest(str(exc), "plumbline.grammar_backend") from None
    return None if grammar is None else dataclasses.replace(grammar, backend=backend)


def bad_words_token_ids(words: list[str], tokenizer: Any) -> tuple[tuple[int, ...], ...]:
    """vLLM's tokenization of bad_words: each word without its leading spaces, and again after
    one space where that starts with another token and has as many tokens (a word-initial
    variant, the form it takes mid-sentence)."""
    out: list[tuple[int, ...]] = []
    for i, word in enumerate(words):
        check_text(word, f"bad_words[{i}]")
        bare = word.lstrip()
        if not bare:
            raise BadRequest(f"bad_words[{i}] is only whitespace", "bad_words")
        plain = tuple(tokenizer(bare, add_special_tokens=False).input_ids)
        spaced = tuple(tokenizer(" " + bare, add_special_tokens=False).input_ids)
        out.append(plain)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return tuple(out)


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: token ids as JSON object keys (strings) -> bias."""
    out = []
    for key, value in (bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise BadRequest(f"logit_bias keys must be token ids, got {key[:32]!r}", "logit_bias")
        out.append((int(key), value))
    return tuple(sorted(out))


def check_text(value: str, param: str) -> None:
    """JSON may smuggle lone surrogates ("\\ud800") that are not valid UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{param} is not valid UTF-8 (lone surrogate)", param) from None


def truncate_prompt(prompt_ids: list[int], k: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last k tokens of the prompt (as rendered, for a
    chat); -1 keeps the last max_model_len. Applied before the length checks, so a prompt too
    long for the context can still be served."""
    if k is None:
        return prompt_ids
    if k == 0:
        raise BadRequest("truncate_prompt_tokens must be -1 or at least 1",
                         "truncate_prompt_tokens")
    if k > max_model_len:
        raise BadRequest(f"truncate_prompt_tokens ({k}) exceeds this model's context of "
                         f"{max_model_len} tokens", "truncate_prompt_tokens")
    return prompt_ids[-(max_model_len if k == -1 else k):]
