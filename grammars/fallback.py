"""Our path for JSON schemas a backend refuses: a relaxed superset grammar + a jsonschema EOS gate.

llguidance compiles ~84% of real-world schemas exactly and refuses the rest (oneOf, not,
if/then, dependencies, uniqueItems, unknown formats, lookaround regexes, ...). For those,
`compile_json_schema` (used by every backend) does:

1. `relaxations(schema)` yields progressively looser schemas, each accepting a superset of the
   documents the original accepts: oneOf rewritten as anyOf and unimplemented keywords ignored
   (llguidance's `lenient`); then constraint keywords the backend chokes on dropped; then any
   JSON value of the schema's top-level type; then any JSON value. The backend compiles the
   first one it can.
2. `ValidatedGrammar` wraps the resulting cursor and allows EOS only where the text so far is
   a complete JSON document that the *original* schema validates (jsonschema, with the format
   checks it knows): the EOS bit is cleared from the mask otherwise, `accept_token(eos)` refuses
   it and `is_terminated()` stays False. Every token other than EOS is judged by the relaxed
   grammar.

Soundness: a sequence only ends through EOS (or is judged terminated), and both require
jsonschema to accept the whole document, so an invalid document is never accepted, whatever the
relaxed grammar let through. The price: before the end the mask is a superset, so generation
can reach a dead end, a complete document (the relaxed grammar allows nothing but EOS) that
fails validation; `fill_bitmask` then writes an all-zero row and `is_dead()` is True, and the
engine must finish the sequence with an error rather than sample from it.

Schemas a backend compiles as given are wrapped too (CompilerOptions.always_validate), as an
audit rather than a mask: the document is validated when EOS is accepted (or termination is
asked), not on every mask, since the exact grammar already allows EOS only after a valid
document. It costs one validation per sequence and catches backend bugs (xgrammar accepts a few
invalid dev instances on its own).
"""
from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from grammars.spec import GrammarError, GrammarSpec

if TYPE_CHECKING:
    import torch

    from grammars.base import CompiledGrammar, CompilerOptions, Grammar

# Keywords whose value is a subschema, a list of subschemas, or a name -> subschema map.
_SUBSCHEMA = ("additionalProperties", "items", "additionalItems", "contains", "propertyNames", "not",
              "if", "then", "else", "unevaluatedItems", "unevaluatedProperties")
_SUBSCHEMA_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAP = ("properties", "patternProperties", "definitions", "$defs", "dependentSchemas")

# Dropping any of these only removes constraints, so the schema accepts more documents.
_CONSTRAINTS = ("pattern", "format", "patternProperties", "propertyNames", "minProperties", "maxProperties",
                "not", "if", "then", "else", "dependencies", "dependentRequired", "dependentSchemas",
                "uniqueItems", "contains", "minContains", "maxContains", "allOf", "multipleOf",
                "unevaluatedProperties", "unevaluatedItems")


# Options for llguidance's JSON compiler at the relaxed levels; other backends ignore them.
_LENIENT = {"coerce_one_of": True, "lenient": True}


def compile_json_schema(spec: GrammarSpec, options: CompilerOptions, backend: str,
                        compile_schema: Callable[[GrammarSpec, Any, dict[str, Any]], CompiledGrammar],
                        decode_bytes: Callable[[list[int]], bytes], eos_token_id: int) -> CompiledGrammar:
    """Compile a json_schema spec exactly if the backend can, else through the relaxed path.

    compile_schema(spec, schema, backend_options) compiles a parsed schema (spec being the
    request's, for the record) or raises GrammarError naming the problem.
    """
    schema = spec.schema()
    if schema is True:
        schema = {}  # accepts everything, in the form every backend reads
    validator = schema_validator(schema)
    grammar_schema = _with_draft7_refs(schema)
    try:
        compiled = compile_schema(spec, inline_one_of_refs(grammar_schema), {})
    except GrammarError as e:
        first_error = str(e)
    else:
        if not options.always_validate:
            return compiled
        return GatedCompiled(spec, compiled, validator, decode_bytes, eos_token_id, gate_mask=False, notes=())
    if not options.json_fallback:
        raise GrammarError(f"unsupported json_schema: {first_error}")
    for note, relaxed, extra in relaxations(grammar_schema, lenient_backend=backend == "llguidance"):
        try:
            compiled = compile_schema(spec, relaxed, extra)
        except GrammarError:
            continue
        notes = (f"relaxed ({note}) because {backend} said: {first_error}",)
        return GatedCompiled(spec, compiled, validator, decode_bytes, eos_token_id, gate_mask=True, notes=notes)
    raise GrammarError(f"unsupported json_schema: {first_error}")


class GatedCompiled:
    """A backend's compiled grammar whose cursors are ValidatedGrammars over the original schema."""

    def __init__(self, spec: GrammarSpec, inner: CompiledGrammar, validator: Any,
                 decode_bytes: Callable[[list[int]], bytes], eos_token_id: int, *, gate_mask: bool,
                 notes: tuple[str, ...]) -> None:
        self.spec = spec
        self.backend = inner.backend
        self.vocab_size = inner.vocab_size
        self.notes = notes
        self.is_exact = not gate_mask
        self._inner = inner
        self._validator = validator
        self._decode = decode_bytes
        self._eos = eos_token_id

    def matcher(self) -> ValidatedGrammar:
        return ValidatedGrammar(self._inner.matcher(), self._validator, self._decode, self._eos,
                                gate_mask=not self.is_exact)


def relaxations(schema: Any, lenient_backend: bool = True) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """Looser and looser supersets of `schema`: (note, relaxed schema, backend JSON options).

    lenient_backend: the backend reads _LENIENT (llguidance), so the schema as given is worth a
    try with it first; its own oneOf coercion keeps more schemas in the order the tests expect
    than our rewrite does (llguidance orders properties of intersections unstably).
    """
    if isinstance(schema, dict):
        if lenient_backend:
            yield "oneOf as anyOf, unsupported keywords ignored", schema, _LENIENT
        any_of = _one_of_as_any_of(copy.deepcopy(schema))
        yield "oneOf rewritten as anyOf, unsupported keywords ignored", any_of, _LENIENT
        yield "constraint keywords dropped", _drop_constraints(copy.deepcopy(any_of)), _LENIENT
        top_type = schema.get("type")
        if isinstance(top_type, (str, list)):
            yield f"any JSON of type {top_type}", {"type": top_type}, {}
    yield "any JSON value", {}, {}


def _subschemas_mapped(node: Any, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """fn applied to a schema, then to every subschema it holds (never to data such as enum values)."""
    if not isinstance(node, dict):
        return node
    node = fn(node)
    for key in _SUBSCHEMA:
        if isinstance(node.get(key), dict):
            node[key] = _subschemas_mapped(node[key], fn)
    for key in _SUBSCHEMA_LIST:
        if isinstance(node.get(key), list):
            node[key] = [_subschemas_mapped(s, fn) for s in node[key]]
    for key in _SUBSCHEMA_MAP:
        if isinstance(node.get(key), dict):
            node[key] = {name: _subschemas_mapped(s, fn) for name, s in node[key].items()}
    return node


_OLD_DRAFTS = ("draft-03", "draft-04", "draft-06", "draft-07")


def _with_draft7_refs(schema: Any) -> Any:
    """Up to draft 7, keywords beside a $ref are ignored; the backends read 2020-12 (intersect).

    Exact, not a relaxation: the grammar gets the schema the draft means. The validator keeps
    the original, read under its own draft.
    """
    if not (isinstance(schema, dict) and any(d in str(schema.get("$schema", "")) for d in _OLD_DRAFTS)):
        return schema

    def drop_siblings(node: dict[str, Any]) -> dict[str, Any]:
        if isinstance(node.get("$ref"), str):
            return {k: v for k, v in node.items() if k in ("$ref", "$schema", "$id", "id", "definitions", "$defs")}
        return node

    return _subschemas_mapped(copy.deepcopy(schema), drop_siblings)


def inline_one_of_refs(schema: Any) -> Any:
    """The schema with each oneOf branch that is only a local `{"$ref": "#/..."}` replaced by a
    copy of its target, where that target holds no `$ref` of its own.

    Exact: the same documents validate. It lets llguidance see the branches: it compiles a
    oneOf exactly where it can prove the branches exclusive (distinct types, const or enum
    discriminators), but does not look through a $ref to do so. Targets with refs of their own
    stay (inlining a recursive schema would never end); so do schemas with a nested `$id`,
    under which a copied subschema could resolve its refs differently.
    """
    if not isinstance(schema, dict) or '"$id"' in json.dumps(schema)[1:]:
        return schema

    def target(branch: Any) -> Any:
        ref = branch.get("$ref") if isinstance(branch, dict) and len(branch) == 1 else None
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return branch
        node: Any = schema
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return branch
            node = node[part]
        if not isinstance(node, dict) or '"$ref"' in json.dumps(node):
            return branch
        return copy.deepcopy(node)

    def inline(node: dict[str, Any]) -> dict[str, Any]:
        if isinstance(node.get("oneOf"), list):
            node["oneOf"] = [target(b) for b in node["oneOf"]]
        return node

    return _subschemas_mapped(copy.deepcopy(schema), inline)


def _one_of_as_any_of(schema: Any) -> Any:
    def rename(node: dict[str, Any]) -> dict[str, Any]:
        # "exactly one of" -> "at least one of": a superset; jsonschema still judges the end.
        if "oneOf" in node and "anyOf" not in node:
            node["anyOf"] = node.pop("oneOf")
        return node

    return _subschemas_mapped(schema, rename)


def _drop_constraints(schema: Any) -> Any:
    def drop(node: dict[str, Any]) -> dict[str, Any]:
        if "patternProperties" in node:
            # additionalProperties applies to keys no pattern matched: once the patterns go,
            # it would wrongly cover those keys too.
            node.pop("additionalProperties", None)
        for key in _CONSTRAINTS:
            node.pop(key, None)
        if "$ref" in node:
            # A $ref with sibling keywords means "both"; keeping only the $ref is a superset.
            node = {k: node[k] for k in ("$ref", "definitions", "$defs") if k in node}
        return node

    return _subschemas_mapped(schema, drop)


def schema_validator(schema: Any) -> Any:
    """A jsonschema validator for the schema's own draft, checking formats it knows."""
    import jsonschema  # type: ignore[import-untyped, unused-ignore]
    from jsonschema import validators  # type: ignore[import-untyped, unused-ignore]

    cls = validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook that refuses a key given twice."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")  # ambiguous documents are never accepted
    return obj


def rollback_inner(matcher: Any, num_tokens: int) -> int:
    """Roll a gating wrapper's inner matcher back `num_tokens` tokens, among them an accepted
    EOS the wrapper keeps no record of (`_ended`); returns how many of its own records to drop.
    (The jsonschema gate here and the tool-call gate, grammars/tool_gate.py, share it.)"""
    matcher._inner.rollback(num_tokens)
    if matcher._ended:
        matcher._ended = False
        num_tokens -= 1
    return num_tokens


class ValidatedGrammar:
    """Wraps a cursor over a relaxed grammar; EOS only where jsonschema accepts the document."""

    __slots__ = ("_inner", "_validator", "_decode", "_eos", "_gate_mask", "_token_ids", "_ended", "_verdict")

    def __init__(self, inner: Grammar, validator: Any, decode_bytes: Callable[[list[int]], bytes],
                 eos_token_id: int, *, gate_mask: bool = True) -> None:
        self._inner = inner
        # True: clear EOS from masks until the document validates (relaxed grammars).
        # False: validate only when EOS is accepted (exact grammars: an audit).
        self._gate_mask = gate_mask
        self._validator = validator
        self._decode = decode_bytes
        self._eos = eos_token_id
        self._token_ids: list[int] = []   # accepted tokens, EOS excluded
        self._ended = False                # EOS accepted
        self._verdict: tuple[int, bool] | None = None  # (len(token_ids), document valid)

    def document_is_valid(self) -> bool:
        """Whether the text so far is a complete JSON document that the original schema accepts."""
        n = len(self._token_ids)
        if self._verdict is not None and self._verdict[0] == n:
            return self._verdict[1]
        try:
            doc = json.loads(self._decode(self._token_ids).decode("utf-8"), object_pairs_hook=no_duplicate_keys)
            valid = bool(self._validator.is_valid(doc))
        except Exception:  # not JSON, bad UTF-8, an unresolvable $ref: fail closed
            valid = False
        self._verdict = (n, valid)
        return valid

    def accept_token(self, token_id: int) -> bool:
        if self._ended:
            return False
        if token_id == self._eos:
            if not (self._inner_accepting() and self.document_is_valid()):
                return False
            if not self._inner.accept_token(token_id):
                return False
            self._ended = True
            return True
        if not self._inner.accept_token(token_id):
            return False
        self._token_ids.append(token_id)
        self._verdict = None
        return True

    def accept(self, token_ids: Sequence[int]) -> bool:
        return all(self.accept_token(t) for t in token_ids)

    @property
    def ll_matcher(self) -> Any:
        """The inner llguidance matcher, for batched mask fills (then gate_row per row)."""
        return getattr(self._inner, "ll_matcher", None)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._inner.fill_bitmask(bitmask, row)
        self.gate_row(bitmask, row)

    def gate_row(self, bitmask: torch.Tensor, row: int) -> None:
        """Clear the EOS bit of a row the inner grammar filled, unless the document validates."""
        if not self._gate_mask:
            return
        word, bit = divmod(self._eos, 32)
        value = int(bitmask[row, word])
        if (value >> bit) & 1 and not self.document_is_valid():
            # Python ints keep two's complement, so this stays within int32 for any bit.
            bitmask[row, word] = value & ~(1 << bit)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        num_tokens = rollback_inner(self, num_tokens)
        if num_tokens:
            del self._token_ids[-num_tokens:]
        self._verdict = None

    def is_terminated(self) -> bool:
        return self._ended or (self._inner.is_terminated() and self.document_is_valid())

    def is_dead(self) -> bool:
        """True where nothing can follow: the relaxed grammar wants EOS but the document fails."""
        inner_dead = getattr(self._inner, "is_dead", None)
        if inner_dead is not None and inner_dead():
            return True
        return not self._ended and self._inner.is_terminated() and not self.document_is_valid()

    def forced_tokens(self) -> list[int]:
        return [t for t in self._inner.forced_tokens() if t != self._eos]

    def reset(self) -> None:
        self._inner.reset()
        self._token_ids.clear()
        self._ended = False
        self._verdict = None

    def _inner_accepting(self) -> bool:
        accepting = getattr(self._inner, "is_accepting", None)
        return True if accepting is None else bool(accepting())
