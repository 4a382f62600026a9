"""Our path for JSON schemas a backend refuses: a relaxed superset grammar + a jsonschema EOS gate.

llguidance compiles ~84% of real-world schemas exactly and refuses the rest (oneOf, not,
if/then, dependencies, uniqueItems, unknown formats, lookaround regexes, ...). For those:

1. `relaxations(schema)` yields progressively looser schemas, each accepting a superset of the
   documents the original accepts: oneOf read as anyOf and unimplemented keywords ignored;
   then constraint keywords the backend chokes on dropped; finally any JSON value of the
   schema's top-level type. The backend compiles the first one it can.
2. `ValidatedGrammar` wraps the resulting cursor and allows EOS only where the text so far is
   a complete JSON document that the *original* schema validates (jsonschema, with format
   checks): the EOS bit is cleared from the mask otherwise, `accept_token(eos)` refuses it and
   `is_terminated()` stays False. Every token other than EOS is judged by the relaxed grammar.

Soundness: a sequence can only end through EOS (or be judged terminated), and both require
jsonschema to accept the whole document, so an invalid document is never accepted. The price:
the mask is a superset before the end, so generation can reach a dead end, a complete document
(the relaxed grammar allows nothing but EOS) that fails validation; `fill_bitmask` then writes an
all-zero row and `is_dead()` is True, and the engine must finish the sequence with an error
rather than sample from it.
"""
from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
    import torch

    from grammars.base import Grammar

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


def relaxations(schema: Any) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """Looser and looser supersets of `schema`: (note, relaxed schema, backend JSON options)."""
    lenient = {"coerce_one_of": True, "lenient": True}
    yield "oneOf as anyOf, unsupported keywords ignored", schema, lenient
    if isinstance(schema, dict):
        yield "constraint keywords dropped", _drop_constraints(copy.deepcopy(schema)), lenient
        top_type = schema.get("type")
        if isinstance(top_type, (str, list)):
            yield f"any JSON of type {top_type}", {"type": top_type}, {}
    yield "any JSON value", {}, {}


def _drop_constraints(node: Any) -> Any:
    if isinstance(node, dict):
        if "patternProperties" in node:
            # additionalProperties applies to keys no pattern matched: once the patterns go,
            # it would wrongly cover those keys too.
            node.pop("additionalProperties", None)
        for key in _CONSTRAINTS:
            node.pop(key, None)
        if "$ref" in node:
            # A $ref with sibling keywords means "both"; keeping only the $ref is a superset.
            node = {"$ref": node["$ref"], **{k: node[k] for k in ("definitions", "$defs") if k in node}}
        for key in _SUBSCHEMA:
            if key in node and isinstance(node[key], (dict, bool)):
                node[key] = _drop_constraints(node[key])
        for key in _SUBSCHEMA_LIST:
            if isinstance(node.get(key), list):
                node[key] = [_drop_constraints(s) for s in node[key]]
        for key in _SUBSCHEMA_MAP:
            if isinstance(node.get(key), dict):
                node[key] = {k: _drop_constraints(s) for k, s in node[key].items()}
    return node


def schema_validator(schema: Any) -> Any:
    """A jsonschema validator for the schema's own draft, checking formats it knows."""
    import jsonschema  # type: ignore[import-untyped, unused-ignore]
    from jsonschema import validators  # type: ignore[import-untyped, unused-ignore]

    cls = validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")  # ambiguous documents are never accepted
    return obj


class ValidatedGrammar:
    """Wraps a cursor over a relaxed grammar; EOS only where jsonschema accepts the document."""

    __slots__ = ("_inner", "_validator", "_decode", "_eos", "_token_ids", "_ended", "_verdict")

    def __init__(self, inner: Grammar, validator: Any, decode_bytes: Callable[[list[int]], bytes],
                 eos_token_id: int) -> None:
        self._inner = inner
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
            doc = json.loads(self._decode(self._token_ids).decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
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
        """The inner llguidance matcher, for batched mask fills (then gate_eos per row)."""
        return getattr(self._inner, "ll_matcher", None)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._inner.fill_bitmask(bitmask, row)
        self.gate_eos(bitmask, row)

    def gate_eos(self, bitmask: torch.Tensor, row: int) -> None:
        """Clear the EOS bit of a row the inner grammar filled, unless the document validates."""
        word, bit = divmod(self._eos, 32)
        value = int(bitmask[row, word])
        if (value >> bit) & 1 and not self.document_is_valid():
            # Python ints keep two's complement, so this stays within int32 for any bit.
            bitmask[row, word] = value & ~(1 << bit)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        self._inner.rollback(num_tokens)
        if self._ended:
            self._ended = False
            num_tokens -= 1
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
