"""Grammar specifications: what a request asks its output to match.

A `GrammarSpec` is plain data (kind + source text), cheap to build and hash, so the gateway can
check it early (`validate()`, a 400 on failure) and the compiler can key its cache on it. The
builders translate the two request dialects we accept: OpenAI `response_format` and vLLM's
`structured_outputs` extra-body object.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, get_args

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "cfg"]
GRAMMAR_KINDS: tuple[str, ...] = get_args(GrammarKind)

# A spec bigger than this is refused before any parsing: the compile pool is shared.
MAX_SOURCE_CHARS = 1 << 20


class GrammarError(ValueError):
    """A grammar spec that cannot be compiled or enforced; maps to a 400 naming the problem."""


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A hashable description of a constraint; the compile-cache key.

    source by kind: json_schema: the schema as JSON text; json_object: "" (any JSON object);
    regex: the pattern (Rust `regex` syntax, matched against the whole output); choice: a JSON
    list of strings; cfg: a Lark grammar (llguidance's dialect).
    """

    kind: GrammarKind
    source: str = ""
    # The grammar library to compile with (grammars.base.backend_name); None: the server's.
    backend: str | None = None
    # Tool calls whose parameter schema the grammar had to relax: JSON text of {tool name:
    # parameters}; each call's arguments are validated against it as they close
    # (grammars/tool_gate.py). "" when every schema compiled exactly.
    gates: str = ""
    # The output may be free text where only a `<tool_call>` tag opens a structure (tools with
    # tool_choice "auto"): budget-aware closing leaves the text before a tag alone.
    free_text: bool = False

    def validate(self) -> None:
        """Raise GrammarError if the spec is malformed; cheap enough for the request path."""
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; expected one of {GRAMMAR_KINDS}")
        if not isinstance(self.source, str):
            raise GrammarError(f"{self.kind} grammar source must be a string")
        if len(self.source) > MAX_SOURCE_CHARS:
            raise GrammarError(f"{self.kind} grammar is too large ({len(self.source)} chars, max {MAX_SOURCE_CHARS})")
        if self.kind == "json_schema":
            check_json_schema(self.schema())
        elif self.kind == "choice":
            self.choices()
        elif self.kind == "regex":
            if not self.source:
                raise GrammarError("regex must not be empty")
            _check_with_llguidance("regex", self.source)
        elif self.kind == "cfg":
            if not self.source.strip():
                raise GrammarError("grammar must not be empty")
            _check_with_llguidance("lark", self.source)

    def schema(self) -> Any:
        """The parsed JSON schema of a json_schema spec (a dict or a bool)."""
        assert self.kind == "json_schema"
        try:
            schema = json.loads(self.source)
        except json.JSONDecodeError as e:
            raise GrammarError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"json_schema must be a JSON object or boolean, got {type(schema).__name__}")
        return schema

    def choices(self) -> list[str]:
        """The alternatives of a choice spec."""
        assert self.kind == "choice"
        try:
            choices = json.loads(self.source)
        except json.JSONDecodeError as e:
            raise GrammarError(f"choice source is not a JSON list: {e}") from None
        if not isinstance(choices, list) or not choices:
            raise GrammarError("choice must be a non-empty list of strings")
        if not all(isinstance(c, str) and c for c in choices):
            raise GrammarError("every choice must be a non-empty string")
        return choices

    # --- builders -------------------------------------------------------------------------

    @classmethod
    def json_schema(cls, schema: Any) -> GrammarSpec:
        """A json_schema spec from a parsed schema (dict/bool) or schema JSON text."""
        # Key order is kept: it decides the order in which properties are generated.
        text = schema if isinstance(schema, str) else json.dumps(schema, separators=(",", ":"))
        return cls("json_schema", text)

    @classmethod
    def choice(cls, choices: list[str]) -> GrammarSpec:
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None) -> GrammarSpec | None:
        """OpenAI `response_format` -> spec; None for {"type": "text"} or no format."""
        if response_format is None:
            return None
        if not isinstance(response_format, Mapping):
            raise GrammarError("response_format must be an object")
        kind = response_format.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return cls("json_object", "")
        if kind == "json_schema":
            body = response_format.get("json_schema")
            if not isinstance(body, Mapping):
                raise GrammarError("response_format.json_schema must be an object with a 'schema'")
            # OpenAI accepts the schema under "schema"; some clients send "json_schema".
            schema = body.get("schema", body.get("json_schema"))
            if schema is None:
                raise GrammarError("response_format.json_schema.schema is required")
            spec = cls.json_schema(schema)
            spec.validate()
            return spec
        raise GrammarError(f"unsupported response_format type {kind!r}")

    @classmethod
    def from_structured_outputs(cls, so: Mapping[str, Any] | None) -> GrammarSpec | None:
        """vLLM `structured_outputs` (json | regex | choice | grammar | json_object) -> spec."""
        if so is None:
            return None
        if not isinstance(so, Mapping):
            raise GrammarError("structured_outputs must be an object")
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object") if so.get(k) not in (None, False)]
        if len(given) > 1:
            raise GrammarError(f"structured_outputs takes exactly one constraint, got {given}")
        if not given:
            unknown = sorted(k for k in so if so[k] is not None)
            if unknown:
                raise GrammarError(f"structured_outputs has no supported constraint (got {unknown})")
            return None
        key = given[0]
        value = so[key]
        if key == "json":
            spec = cls.json_schema(value)
        elif key == "json_object":
            spec = cls("json_object", "")
        elif key == "choice":
            if not isinstance(value, list):
                raise GrammarError("structured_outputs.choice must be a list of strings")
            spec = cls.choice(value)
        elif key == "regex":
            if not isinstance(value, str):
                raise GrammarError("structured_outputs.regex must be a string")
            spec = cls("regex", value)
        else:
            if not isinstance(value, str):
                raise GrammarError("structured_outputs.grammar must be a string (Lark syntax)")
            spec = cls("cfg", value)
        spec.validate()
        return spec


def check_json_schema(schema: Any) -> None:
    """Raise GrammarError if `schema` is not a valid JSON schema under its own draft."""
    import jsonschema  # type: ignore[import-untyped, unused-ignore]
    from jsonschema import validators  # type: ignore[import-untyped, unused-ignore]

    if schema is False:
        raise GrammarError("json_schema false accepts no document")
    if schema is True:
        return
    try:
        cls = validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise GrammarError(f"invalid json_schema at {where}: {e.message}") from None
    except Exception as e:  # a malformed $schema or a schema the meta-validator chokes on
        raise GrammarError(f"invalid json_schema: {e}") from None
    _check_refs_resolve(schema)


def _check_refs_resolve(schema: dict[str, Any]) -> None:
    # Remote references are never fetched: a schema that needs one could not be enforced (the
    # EOS gate would refuse every document), so it is a 400 now rather than a dead end later.
    from urllib.parse import urljoin

    refs: list[str] = []

    def walk(node: Any, base: str) -> None:
        if isinstance(node, dict):
            node_id = node.get("$id", node.get("id"))
            if isinstance(node_id, str):
                base = urljoin(base, node_id)
            ref = node.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                refs.append(urljoin(base, ref))
            for value in node.values():
                walk(value, base)
        elif isinstance(node, list):
            for value in node:
                walk(value, base)

    walk(schema, "")
    if not refs:
        return
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    resource = Resource.from_contents(schema, default_specification=DRAFT202012)
    root = resource.id() or ""
    resolver = Registry().with_resource(root, resource).crawl().resolver(base_uri=root)
    for ref in refs:
        try:
            resolver.lookup(ref)
        except Exception:
            raise GrammarError(f"json_schema $ref {ref!r} cannot be resolved (remote references are not fetched)") from None


def _check_with_llguidance(fmt: Literal["regex", "lark"], text: str) -> None:
    # The default backend's own parser judges regex and Lark syntax: its dialects (Rust regex,
    # llguidance Lark) are what will be enforced, and Python's `re` disagrees with both.
    import llguidance

    grammar = (llguidance.LLMatcher.grammar_from_regex(text) if fmt == "regex"
               else llguidance.LLMatcher.grammar_from_lark(text))
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        what = "regex" if fmt == "regex" else "grammar"
        raise GrammarError(f"invalid {what}: {_first_line(error)}")


def _first_line(message: str) -> str:
    return re.sub(r"\s+", " ", message.strip().split("\n<state>")[0])[:500]
