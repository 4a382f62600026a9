"""The grammar of a response with tools (llguidance's Lark dialect).

    auto:                 free text without the opening tag, then optionally calls
    auto + a format:      one JSON document in the response format, or calls
    required / named:     calls only (a response format governs the answer that follows the
                          tool results, not this turn)

Calls are written in the one format grammars/tools.py shows the model; the grammar fixes the
bytes around each call's arguments (so gateway/tool_calls.py finds them by position), and the
arguments follow that tool's parameter schema through llguidance's `%json`; nothing may follow
the calls.

No schema left behind: a schema llguidance cannot express exactly (oneOf whose branches may
overlap, not, if/then, uniqueItems, unknown formats, ...) is relaxed as response_format's is
(grammars/fallback.py: the first superset llguidance takes) and the original goes into the
spec's `gates`; grammars/tool_gate.py then lets a call's arguments (or the document) close only
where jsonschema accepts them. A oneOf whose branches exclude each other compiles exactly:
llguidance proves that itself (distinct types, const/enum discriminators), and branches given
as local `$ref`s are inlined first so it can see them (fallback.inline_one_of_refs).
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from grammars.fallback import inline_one_of_refs, relaxations
from grammars.spec import GrammarError, GrammarSpec
from grammars.tools import CALL_SEPARATOR, CLOSE_TAG, MAX_PARALLEL_CALLS, OPEN_TAG, ToolsRequest, call_prefix

# Arguments are written the way json.dumps writes them (and the way the prompt shows them):
# ", " and ": " separators, no other whitespace, so the model cannot run away on blanks. A
# response-format document beside tools is written the same way.
_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def tool_call_grammar(request: ToolsRequest | None, tokenizer: Any = None) -> GrammarSpec | None:
    """The grammar a response with tools must match; None when tools do not constrain it.

    required/named: one call, or 1..MAX_PARALLEL_CALLS when parallel. auto: free text, then
    optionally calls; with `request.answer_format` (json_schema or json_object) a document in
    that format instead of the free text. Raises GrammarError for what cannot be served.
    """
    if request is None or not request.is_active:
        return None
    if tokenizer is not None and _tag_is_special(tokenizer):
        raise GrammarError(f"tool calls need {OPEN_TAG} to be plain text, but this tokenizer makes it a special token")
    max_calls = MAX_PARALLEL_CALLS if request.parallel else 1
    more_calls = f" ({_lit(CALL_SEPARATOR)} call){{0,{max_calls - 1}}}" if max_calls > 1 else ""
    rules = [f"calls: call{more_calls}",
             f"call: {_lit(OPEN_TAG)} body {_lit(CLOSE_TAG)}",
             "body: " + " | ".join(f"fn_{i}" for i in range(len(request.allowed)))]
    gates: dict[str, Any] = {}
    document = None if request.mode != "auto" else _document_schema(request.answer_format)
    if document is not None:
        doc_schema, exact = _json_rule(document)
        rules = ["start: doc | calls", f"doc: %json {doc_schema}"] + rules
        if not exact:
            gates["document"] = document
    elif request.mode == "auto":
        # A single regular terminal: text free of the tag, then the tag. llguidance's lexer
        # would not end a free-text terminal where "<tool_call>" begins (measured: TEXT followed
        # by a literal tag rejects the tag), so the tag is part of the terminal that opens a call.
        rules = ["start: TEXT | HEAD body " + _lit(CLOSE_TAG) + more_calls,
                 r"TEXT: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/",
                 "HEAD: TEXT " + _lit(OPEN_TAG)] + rules[1:]
    else:
        rules = ["start: calls"] + rules
    for i, tool in enumerate(request.allowed):
        args_schema, exact = _json_rule(_closed(tool.parameters))
        rules.append(f"fn_{i}: {_lit(call_prefix(tool.name))} args_{i} \"}}\"")
        rules.append(f"args_{i}: %json {args_schema}")
        if not exact:   # judged as the exact grammar would: undeclared keys refused
            gates.setdefault("tools", {})[tool.name] = _closed(tool.parameters)
    return GrammarSpec("cfg", "\n".join(rules) + "\n",
                       gates=json.dumps(gates, ensure_ascii=False) if gates else "",
                       free_text=request.mode == "auto" and document is None)


def _document_schema(response_format: GrammarSpec | None) -> Any:
    """The schema of the document a response format asks for; None without a format."""
    if response_format is None:
        return None
    if response_format.kind == "json_object":
        return {"type": "object"}
    if response_format.kind == "json_schema":
        schema = response_format.schema()
        return {} if schema is True else schema
    raise GrammarError(f"tools combine with a JSON response format only, not with a {response_format.kind} "
                       "constraint")


def _json_rule(schema: Any) -> tuple[str, bool]:
    """The `%json` body for `schema` and whether it is exact; else the first relaxation that
    llguidance takes (a superset: the gate judges the original)."""
    import llguidance

    def compiles(candidate: Any, extra: Mapping[str, Any]) -> str | None:
        if isinstance(candidate, dict):
            candidate = {**candidate, "x-guidance": {**_JSON_FORMAT, **extra, **candidate.get("x-guidance", {})}}
        text = json.dumps(candidate, ensure_ascii=False)
        grammar = llguidance.LLMatcher.grammar_from_lark(f"start: %json {text}")
        return None if llguidance.LLMatcher.validate_grammar(grammar) else text

    exact = compiles(inline_one_of_refs(schema), {})
    if exact is not None:
        return exact, True
    for _, relaxed, extra in relaxations(schema):
        text = compiles(relaxed, extra)
        if text is not None:
            return text, False
    raise GrammarError("no relaxation of the schema compiles")   # "any JSON value" always does


def _closed(parameters: Mapping[str, Any]) -> dict[str, Any]:
    # Where the schema says nothing about undeclared keys, the grammar allows none (as OpenAI's
    # strict mode does): every output still validates, and a small model cannot wander off
    # inventing nested keys until max_tokens (seen with the default model).
    schema = dict(parameters)
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if "properties" in schema and not any(k in schema for k in open_keys):
        schema["additionalProperties"] = False
    return schema


def _lit(text: str) -> str:
    # llguidance Lark string literals take JSON string escapes.
    return json.dumps(text, ensure_ascii=False)


def _tag_is_special(tokenizer: Any) -> bool:
    special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    return OPEN_TAG in special or CLOSE_TAG in special
