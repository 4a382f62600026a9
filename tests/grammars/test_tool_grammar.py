"""The tool grammar beside a response format, and tool schemas the backend cannot express
(relaxed, with the per-call jsonschema gate of grammars/tool_gate.py)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from grammars import GrammarError, GrammarSpec, allocate_bitmask
from grammars.tools import parse_tools_request, tool_call_grammar, tools_system_prompt
from tests.grammars.conftest import allowed_ids, encode
from tests.grammars.test_tools import ADD, TOOLS, WEATHER, fn

FORMAT = GrammarSpec.json_schema({"type": "object", "properties": {"answer": {"type": "string"}},
                                  "required": ["answer"], "additionalProperties": False})
CALL = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'


def _answering(request: Any, answer_format: GrammarSpec) -> Any:
    """The tools request with a response format beside it (as routes.chat_completions sets it)."""
    return dataclasses.replace(request, answer_format=answer_format)


def accepts(compiler: Any, tokenizer: Any, spec: GrammarSpec, text: str) -> bool:
    """Whether a fresh cursor takes the whole text and then EOS."""
    g = compiler.compile(spec).matcher()
    return all(g.accept_token(t) for t in encode(tokenizer, text) + [tokenizer.eos_token_id])


def test_auto_with_a_format_allows_a_document_or_calls_only(compiler: Any, tokenizer: Any) -> None:
    spec = tool_call_grammar(_answering(parse_tools_request(TOOLS, "auto"), FORMAT), tokenizer)
    assert spec is not None and not spec.free_text and not spec.gates
    spec.validate()
    assert accepts(compiler, tokenizer, spec, '{"answer": "Paris"}')
    assert accepts(compiler, tokenizer, spec, CALL)
    assert accepts(compiler, tokenizer, spec, CALL + "\n" + CALL)
    assert not accepts(compiler, tokenizer, spec, "Paris")                        # free text
    assert not accepts(compiler, tokenizer, spec, '{"answer": 3}')                # off the format
    assert not accepts(compiler, tokenizer, spec, '{"answer": "x", "more": 1}')
    assert not accepts(compiler, tokenizer, spec, '{"answer": "x"}' + CALL)       # not both
    assert not accepts(compiler, tokenizer, spec, "Sure. " + CALL)
    obj = tool_call_grammar(_answering(parse_tools_request(TOOLS, "auto"), GrammarSpec("json_object")),
                            tokenizer)
    assert obj is not None
    assert accepts(compiler, tokenizer, obj, '{"anything": [1, 2]}') and accepts(compiler, tokenizer, obj, CALL)
    assert not accepts(compiler, tokenizer, obj, "[1, 2]")


def test_the_prompt_asks_for_what_the_grammar_allows() -> None:
    auto = parse_tools_request(TOOLS, "auto")
    assert "otherwise answer in plain text." in tools_system_prompt(auto)
    assert "otherwise answer with one JSON document in the requested format." in tools_system_prompt(
        _answering(auto, FORMAT))


def test_required_with_a_format_asks_for_a_call(compiler: Any, tokenizer: Any) -> None:
    spec = tool_call_grammar(_answering(parse_tools_request(TOOLS, "required"), FORMAT), tokenizer)
    assert spec is not None
    assert accepts(compiler, tokenizer, spec, CALL)
    assert not accepts(compiler, tokenizer, spec, '{"answer": "Paris"}')


def test_a_format_that_is_not_json_is_refused_beside_tools(tokenizer: Any) -> None:
    with pytest.raises(GrammarError, match="JSON response format only"):
        tool_call_grammar(_answering(parse_tools_request(TOOLS, "auto"), GrammarSpec("regex", "a+")), tokenizer)


def test_free_text_is_marked_only_for_auto_without_a_format(tokenizer: Any) -> None:
    auto = tool_call_grammar(parse_tools_request(TOOLS, "auto"), tokenizer)
    required = tool_call_grammar(parse_tools_request(TOOLS, "required"), tokenizer)
    assert auto is not None and auto.free_text
    assert required is not None and not required.free_text


def _prop(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {"v": schema}, "required": ["v"]}


# (keyword, parameters llguidance refuses, arguments that validate, arguments the relaxed
# grammar takes but jsonschema refuses, or None where the superset is the schema itself)
UNEXPRESSIBLE = [
    ("oneOf", _prop({"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 5}]}),
     '{"v": 7.5}', '{"v": 7}'),
    ("not", _prop({"type": "integer", "not": {"const": 3}}), '{"v": 4}', '{"v": 3}'),
    ("if/then", {"type": "object", "properties": {"kind": {"type": "string"}, "n": {"type": "integer"}},
                 "required": ["kind"], "if": {"properties": {"kind": {"const": "count"}}},
                 "then": {"required": ["n"]}},
     '{"kind": "count", "n": 2}', '{"kind": "count"}'),
    ("uniqueItems", _prop({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
     '{"v": [1, 2]}', '{"v": [1, 1]}'),
    ("unknown format", _prop({"type": "string", "format": "plumbline-code"}), '{"v": "x"}', None),
]


@pytest.mark.parametrize("keyword, params, good, bad", UNEXPRESSIBLE, ids=[u[0] for u in UNEXPRESSIBLE])
def test_tool_schemas_the_backend_cannot_express_are_relaxed_and_gated(
        compiler: Any, tokenizer: Any, keyword: str, params: dict[str, Any], good: str, bad: str | None) -> None:
    spec = tool_call_grammar(parse_tools_request([fn("t", params)], "required", False), tokenizer)
    assert spec is not None and json.loads(spec.gates)["tools"]["t"]["properties"] == params["properties"]
    spec.validate()

    def call(args: str) -> str:
        return f'<tool_call>{{"name": "t", "arguments": {args}}}</tool_call>'

    assert accepts(compiler, tokenizer, spec, call(good))
    assert not accepts(compiler, tokenizer, spec, call('{"v": {"deep": 1}}'))   # the superset's own limits
    if bad is None:
        return
    assert not accepts(compiler, tokenizer, spec, call(bad))
    # The gate works on the mask too: where the arguments could close, a token that closes
    # them ("}", "}}", ...) is allowed only if the arguments it completes validate.
    g = compiler.compile(spec).matcher()
    bitmask = allocate_bitmask(1, len(tokenizer))
    for args, allowed in ((bad[:-1], False), (good[:-1], True)):
        g.reset()
        assert g.accept(encode(tokenizer, '<tool_call>{"name": "t", "arguments": ' + args))
        g.fill_bitmask(bitmask, 0)
        closing = [t for t in allowed_ids(bitmask, 0, len(tokenizer)) if tokenizer.decode([t]).startswith("}")]
        assert bool(closing) is allowed, args


def test_a_gated_dead_end_is_dead(compiler: Any, tokenizer: Any) -> None:
    # After {"v": true only "}" may follow (no other keys), and the gate refuses it.
    params = _prop({"type": "boolean", "not": {"const": True}})
    spec = tool_call_grammar(parse_tools_request([fn("t", params)], "required", False), tokenizer)
    assert spec is not None and spec.gates
    g = compiler.compile(spec).matcher()
    assert g.accept(encode(tokenizer, '<tool_call>{"name": "t", "arguments": {"v": true'))
    assert g.is_dead()
    g.reset()
    assert g.accept(encode(tokenizer, '<tool_call>{"name": "t", "arguments": {"v": false'))
    assert not g.is_dead()


def test_a_gated_document_beside_tools(compiler: Any, tokenizer: Any) -> None:
    fmt = GrammarSpec.json_schema(_prop({"type": "integer", "not": {"const": 3}}))
    spec = tool_call_grammar(_answering(parse_tools_request([ADD], "auto"), fmt), tokenizer)
    assert spec is not None and "document" in json.loads(spec.gates)
    assert accepts(compiler, tokenizer, spec, '{"v": 4}') and accepts(compiler, tokenizer, spec, CALL)
    assert not accepts(compiler, tokenizer, spec, '{"v": 3}')
    # A scalar document has no bracket to close: it is judged where it could end.
    scalar = tool_call_grammar(_answering(parse_tools_request([ADD], "auto"),
                                          GrammarSpec.json_schema({"type": "string", "not": {"const": "no"}})),
                               tokenizer)
    assert scalar is not None and "document" in json.loads(scalar.gates)
    assert accepts(compiler, tokenizer, scalar, '"yes"') and accepts(compiler, tokenizer, scalar, CALL)
    assert not accepts(compiler, tokenizer, scalar, '"no"')
    g = compiler.compile(scalar).matcher()
    assert g.accept(encode(tokenizer, '"no"'))
    assert not g.is_terminated() and g.is_dead()


REF_BRANCHES = {"$defs": {"Cat": {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                                  "required": ["kind"], "additionalProperties": False},
                          "Dog": {"type": "object", "properties": {"kind": {"enum": ["dog"]}, "good": {"type": "boolean"}},
                                  "required": ["kind"], "additionalProperties": False}},
                "type": "object", "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]}},
                "required": ["pet"]}


@pytest.mark.parametrize("params", [
    _prop({"oneOf": [{"type": "string"}, {"type": "integer"}]}),              # different types
    _prop({"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
                     {"type": "object", "properties": {"k": {"const": "b"}, "x": {"type": "integer"}},
                      "required": ["k"]}]}),                                    # a const discriminator
    REF_BRANCHES,                                                               # the same, through $refs
], ids=["types", "discriminator", "ref-discriminator"])
def test_exclusive_one_of_compiles_exactly(compiler: Any, tokenizer: Any, params: dict[str, Any]) -> None:
    spec = tool_call_grammar(parse_tools_request([fn("t", params)], "required"), tokenizer)
    assert spec is not None and spec.gates == ""
    compiled = compiler.compile(GrammarSpec.json_schema(params))
    assert compiled.is_exact and not compiled.notes


def test_exclusive_one_of_through_refs_is_enforced(compiler: Any, tokenizer: Any) -> None:
    spec = tool_call_grammar(parse_tools_request([fn("t", REF_BRANCHES)], "required", False), tokenizer)
    assert spec is not None

    def call(args: str) -> str:
        return f'<tool_call>{{"name": "t", "arguments": {args}}}</tool_call>'

    assert accepts(compiler, tokenizer, spec, call('{"pet": {"kind": "cat", "lives": 9}}'))
    assert accepts(compiler, tokenizer, spec, call('{"pet": {"kind": "dog", "good": true}}'))
    assert not accepts(compiler, tokenizer, spec, call('{"pet": {"kind": "dog", "lives": 9}}'))


def test_weather_and_add_stay_exact(tokenizer: Any) -> None:
    spec = tool_call_grammar(parse_tools_request([WEATHER, ADD], "auto"), tokenizer)
    assert spec is not None and spec.gates == ""
