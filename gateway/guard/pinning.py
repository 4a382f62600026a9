"""Enforce mode: pin asserted keys in the requested schema, so the grammar rules the
contradiction out."""
from __future__ import annotations

import copy
from typing import Any, Iterable

from jsonschema import validators  # type: ignore[import-untyped]

from gateway.guard.facts import Assertion, unescape_token


def _resolve(node: Any, root: dict[str, Any]) -> Any:
    ref = node.get("$ref") if isinstance(node, dict) else None
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(unescape_token(part)) if isinstance(target, dict) else None
        if isinstance(target, dict):
            merged = {k: v for k, v in node.items() if k != "$ref"}
            return {**copy.deepcopy(target), **merged}
    return node


def pin_schema(schema: dict[str, Any], assertions: Iterable[Assertion] | dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` where each asserted key it declares is `const` to its asserted value.

    Keys the schema does not declare are left alone, as are values the original sub-schema
    would reject: pinning those would make the grammar unsatisfiable rather than consistent.
    """
    items = assertions.items() if isinstance(assertions, dict) else ((a.key, a.value) for a in assertions)
    pinned = copy.deepcopy(schema)
    for key, value in items:
        parts = [unescape_token(p) for p in key.split("/")[1:]]
        if not parts:
            continue
        parent: Any = None
        slot: Any = None
        node: Any = pinned
        for part in parts:
            node = _resolve(node, pinned)
            if parent is not None:
                parent[slot] = node     # materialize the resolved $ref in place
            if not isinstance(node, dict):
                node = None
                break
            if part in (node.get("properties") or {}):
                parent, slot = node["properties"], part
            elif part.isdigit() and isinstance(node.get("prefixItems"), list) \
                    and int(part) < len(node["prefixItems"]):
                parent, slot = node["prefixItems"], int(part)
            elif part.isdigit() and isinstance(node.get("items"), dict):
                parent, slot = node, "items"   # pins every element: only when the key says index
            else:
                node = None
                break
            node = parent[slot]
        if node is None or parent is None or slot == "items":
            continue
        sub = _resolve(node, pinned)
        if isinstance(sub, dict):
            try:
                ok = validators.validator_for(sub)(sub).is_valid(value)
            except Exception:   # an odd sub-schema: pin nothing rather than guess
                ok = False
            if ok:
                parent[slot] = {"const": value}
    return pinned
