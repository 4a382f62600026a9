"""The consistency buffer: facts the conversation already asserted, keyed by JSON pointer.

Facts come from leaves of JSON in earlier assistant messages, arguments of earlier tool calls,
JSON tool results and the client's `plumbline.assertions`. All share one flat namespace of JSON
pointers into the value they came from (`/customer_id`), so a tool call's `customer_id` argument
and a later structured answer's `customer_id` field are the same fact. Later facts replace
earlier ones; client-declared facts win over everything.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator


@dataclass(frozen=True, slots=True)
class Assertion:
    key: str      # JSON pointer
    value: Any
    source: str   # where the fact was stated, for the violation message


def escape_token(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def unescape_token(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def iter_leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(pointer, scalar) for every leaf of a parsed JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from iter_leaves(v, f"{prefix}/{escape_token(str(k))}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from iter_leaves(v, f"{prefix}/{i}")
    else:
        yield prefix, value


def same_value(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def json_or_none(text: Any) -> Any:
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


class AssertionBuffer:
    """Key -> latest `Assertion`."""

    def __init__(self, assertions: Iterable[Assertion] = ()) -> None:
        self.facts: dict[str, Assertion] = {}
        self.extend(assertions)

    def add(self, key: str, value: Any, source: str) -> None:
        self.facts[key] = Assertion(key, value, source)

    def extend(self, assertions: Iterable[Assertion]) -> None:
        for a in assertions:
            self.facts[a.key] = a

    def add_json(self, value: Any, source: str) -> None:
        if isinstance(value, (dict, list)):   # a bare scalar has no key to assert
            for key, leaf in iter_leaves(value):
                self.add(key, leaf, source)

    def get(self, key: str) -> Assertion | None:
        return self.facts.get(key)

    def conflict(self, key: str, value: Any) -> Assertion | None:
        """The earlier assertion `value` contradicts, if any."""
        fact = self.facts.get(key)
        return fact if fact is not None and not same_value(fact.value, value) else None

    def __len__(self) -> int:
        return len(self.facts)

    @classmethod
    def from_conversation(cls, messages: list[dict[str, Any]],
                          declared: dict[str, Any] | None = None,
                          session: Iterable[Assertion] = ()) -> AssertionBuffer:
        """Session facts, then the messages in order, then the client's declarations."""
        buf = cls(session)
        for i, msg in enumerate(messages):
            role = msg.get("role")
            if role == "assistant":
                buf.add_json(json_or_none(msg.get("content")), f"assistant message {i}")
                for call in msg.get("tool_calls") or []:
                    fn = call.get("function") or {}
                    buf.add_json(json_or_none(fn.get("arguments")),
                                 f"tool call {fn.get('name')} ({call.get('id')}) arguments, message {i}")
            elif role == "tool":
                buf.add_json(json_or_none(msg.get("content")),
                             f"tool result {msg.get('tool_call_id')}, message {i}")
        for key, value in (declared or {}).items():
            buf.add(key, value, "plumbline.assertions")
        return buf


def validate_assertions(declared: Any) -> dict[str, Any]:
    """The client's `plumbline.assertions`; ValueError names what is wrong."""
    if not isinstance(declared, dict):
        raise ValueError("plumbline.assertions must be an object from JSON pointers to values")
    for key in declared:
        if not key.startswith("/"):
            raise ValueError(f"plumbline.assertions key {key!r} is not a JSON pointer (starts with '/')")
    return declared
