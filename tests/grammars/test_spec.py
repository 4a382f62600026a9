"""GrammarSpec: early validation (400s) and the request-format builders."""
from __future__ import annotations

import json

import pytest

from grammars import GrammarError, GrammarSpec


@pytest.mark.parametrize("spec, message", [
    (GrammarSpec("json_schema", "{not json"), "not valid JSON"),
    (GrammarSpec("json_schema", "[1, 2]"), "must be a JSON object or boolean"),
    (GrammarSpec("json_schema", '{"type": 5}'), "invalid json_schema"),
    (GrammarSpec("json_schema", '{"properties": {"a": {"minLength": -1}}}'), "properties/a/minLength"),
    (GrammarSpec("json_schema", "false"), "accepts no document"),
    (GrammarSpec.json_schema({"properties": {"a": {"$ref": "https://example.com/a.json"}}}), "cannot be resolved"),
    (GrammarSpec("regex", ""), "regex must not be empty"),
    (GrammarSpec("regex", "(ab"), "invalid regex"),
    (GrammarSpec("choice", "[]"), "non-empty list"),
    (GrammarSpec("choice", '["a", 3]'), "non-empty string"),
    (GrammarSpec("choice", "a, b"), "not a JSON list"),
    (GrammarSpec("cfg", "start: foo"), "invalid grammar"),
    (GrammarSpec("cfg", "  "), "must not be empty"),
    (GrammarSpec("yaml", "x"), "unknown grammar kind"),  # type: ignore[arg-type]
])
def test_validate_names_the_problem(spec: GrammarSpec, message: str) -> None:
    with pytest.raises(GrammarError, match=message):
        spec.validate()


@pytest.mark.parametrize("spec", [
    GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}),
    GrammarSpec.json_schema(True),
    GrammarSpec.json_schema({"$id": "http://x.org/root.json", "$defs": {"a": {"$id": "a.json", "type": "integer"}},
                             "properties": {"p": {"$ref": "a.json"}, "q": {"$ref": "#/$defs/a"}}}),
    GrammarSpec("json_object", ""),
    GrammarSpec("regex", r"\d{3}-[a-z]+"),
    GrammarSpec.choice(["yes", "no"]),
    GrammarSpec("cfg", 'start: "a" b\nb: "b"+'),
])
def test_validate_accepts_good_specs(spec: GrammarSpec) -> None:
    spec.validate()


def test_spec_is_hashable_and_keeps_key_order() -> None:
    a = GrammarSpec.json_schema({"b": 1, "a": 2})
    assert a == GrammarSpec("json_schema", '{"b":1,"a":2}')
    assert len({a, GrammarSpec.json_schema({"b": 1, "a": 2})}) == 1


def test_from_response_format() -> None:
    assert GrammarSpec.from_response_format(None) is None
    assert GrammarSpec.from_response_format({"type": "text"}) is None
    assert GrammarSpec.from_response_format({"type": "json_object"}) == GrammarSpec("json_object", "")
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    spec = GrammarSpec.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}})
    assert spec is not None and spec.kind == "json_schema" and json.loads(spec.source) == schema
    with pytest.raises(GrammarError, match="schema is required"):
        GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {"name": "t"}})
    with pytest.raises(GrammarError, match="unsupported response_format"):
        GrammarSpec.from_response_format({"type": "xml"})
    with pytest.raises(GrammarError, match="invalid json_schema"):
        GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}})


def test_from_structured_outputs() -> None:
    assert GrammarSpec.from_structured_outputs(None) is None
    assert GrammarSpec.from_structured_outputs({"json": {"type": "integer"}}) == GrammarSpec("json_schema", '{"type":"integer"}')
    assert GrammarSpec.from_structured_outputs({"json": '{"type": "integer"}'}) == GrammarSpec("json_schema", '{"type": "integer"}')
    assert GrammarSpec.from_structured_outputs({"regex": "[a-z]+"}) == GrammarSpec("regex", "[a-z]+")
    assert GrammarSpec.from_structured_outputs({"choice": ["a", "b"]}) == GrammarSpec.choice(["a", "b"])
    assert GrammarSpec.from_structured_outputs({"grammar": 'start: "x"'}) == GrammarSpec("cfg", 'start: "x"')
    assert GrammarSpec.from_structured_outputs({"json_object": True}) == GrammarSpec("json_object", "")
    with pytest.raises(GrammarError, match="exactly one"):
        GrammarSpec.from_structured_outputs({"regex": "a", "choice": ["a"]})
    with pytest.raises(GrammarError, match="non-empty list"):
        GrammarSpec.from_structured_outputs({"choice": []})
    with pytest.raises(GrammarError, match="no supported constraint"):
        GrammarSpec.from_structured_outputs({"structural_tag": "x"})
