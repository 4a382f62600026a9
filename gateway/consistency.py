"""The consistency buffer: facts the conversation already asserted, keyed by JSON pointer.

Facts come from leaves of JSON in earlier assistant messages, arguments of earlier tool calls,
JSON tool results and the client's `plumbline.assertions`. All share one flat namespace of JSON
pointers into the value they came from (`/customer_id`), so a tool call's `customer_id` argument
and a later structured answer's `customer_id` field are the same fact. Later facts replace
earlier ones; client-declared facts win over everything.
"""
from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

from jsonschema import validators  # type: ignore[import-untyped]


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


# -- session store ------------------------------------------------------------------------------

class SessionStore(Protocol):
    """Facts kept across requests under `plumbline.session_id`; a shared store can replace it."""

    def load(self, session_id: str) -> list[Assertion]: ...

    def save(self, session_id: str, assertions: Iterable[Assertion]) -> None: ...


class InMemorySessionStore:
    """Per-process store; a session expires `ttl_s` after its last save."""

    def __init__(self, ttl_s: float = 3600.0, max_sessions: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_sessions, self.clock = ttl_s, max_sessions, clock
        self._sessions: dict[str, tuple[float, dict[str, Assertion]]] = {}
        self._lock = threading.Lock()

    def load(self, session_id: str) -> list[Assertion]:
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None:
                return []
            if entry[0] <= self.clock():
                del self._sessions[session_id]
                return []
            return list(entry[1].values())

    def save(self, session_id: str, assertions: Iterable[Assertion]) -> None:
        with self._lock:
            now = self.clock()
            entry = self._sessions.pop(session_id, None)
            facts = entry[1] if entry is not None and entry[0] > now else {}
            for a in assertions:
                facts[a.key] = a
            self._sessions[session_id] = (now + self.ttl_s, facts)   # re-insert: newest last
            while len(self._sessions) > self.max_sessions:           # drop the stalest
                del self._sessions[next(iter(self._sessions))]


# -- incremental JSON pointer tracking ----------------------------------------------------------

_WS = " \t\r\n"
_SCALAR_START = set('-0123456789tfn')


@dataclass(slots=True)
class _Frame:
    is_object: bool
    pointer: str
    key: str | None = None   # object: the key whose value comes next
    index: int = 0           # array: the index of the next element
    expect: str = "value"    # object: key | colon | value | comma; array: value | comma


class JsonPointerParser:
    """Fed text chunks, yields (pointer, value, start, end) for each completed JSON leaf.

    Offsets are absolute in the fed text. Text before the first `{`/`[` is skipped; on a syntax
    error the parser drops the value and looks for the next `{`/`[` (prose around JSON).
    """

    def __init__(self) -> None:
        self.pos = 0
        self.stack: list[_Frame] = []
        self.token_start = -1     # start of the scalar being read, -1 when none
        self.token = ""           # raw text of that scalar
        self.in_string = False
        self.escape = False
        self.string_is_key = False

    def feed(self, chunk: str) -> list[tuple[str, Any, int, int]]:
        out: list[tuple[str, Any, int, int]] = []
        i, n = 0, len(chunk)
        while i < n:
            if not self.stack:   # fast skip to the next container start
                j = _find_open(chunk, i)
                if j < 0:
                    self.pos += n - i
                    break
                self.pos += j - i
                i = j
            ch = chunk[i]
            if self.in_string:
                # Take the run of plain characters at once.
                j = i
                while j < n:
                    c = chunk[j]
                    if self.escape:
                        self.escape = False
                    elif c == "\\":
                        self.escape = True
                    elif c == '"':
                        break
                    j += 1
                self.token += chunk[i:j]
                self.pos += j - i
                i = j
                if i < n:   # closing quote
                    self.token += '"'
                    self.pos += 1
                    i += 1
                    self.in_string = False
                    self._string_done(out)
                continue
            self._char(ch, out)
            self.pos += 1
            i += 1
        return out

    def _string_done(self, out: list[tuple[str, Any, int, int]]) -> None:
        try:
            value = json.loads(self.token)
        except ValueError:
            return self._reset()
        frame = self.stack[-1]
        if self.string_is_key:
            frame.key, frame.expect = value, "colon"
        else:
            out.append((self._child(frame), value, self.token_start, self.pos))
            self._advance(frame)
        self.token, self.token_start = "", -1

    def _scalar_done(self, out: list[tuple[str, Any, int, int]]) -> bool:
        try:
            value = json.loads(self.token)
        except ValueError:
            self._reset()
            return False
        frame = self.stack[-1]
        out.append((self._child(frame), value, self.token_start, self.pos))
        self._advance(frame)
        self.token, self.token_start = "", -1
        return True

    def _char(self, ch: str, out: list[tuple[str, Any, int, int]]) -> None:
        if self.token_start >= 0:       # inside a number or literal
            if ch in _WS or ch in ",]}":
                if not self._scalar_done(out):
                    return
            else:
                self.token += ch
                return
        if not self.stack:
            self.stack.append(_Frame(ch == "{", "", expect="key" if ch == "{" else "value"))
            return
        frame = self.stack[-1]
        if ch in _WS:
            return
        if frame.expect == "value":
            if ch == "{" or ch == "[":
                self.stack.append(_Frame(ch == "{", self._child(frame),
                                         expect="key" if ch == "{" else "value"))
            elif ch == '"':
                self._start_string(False)
            elif ch in _SCALAR_START:
                self.token_start, self.token = self.pos, ch
            elif ch == "]" and not frame.is_object and frame.index == 0:
                self._close()
            else:
                self._reset()
        elif frame.expect == "key":
            if ch == '"':
                self._start_string(True)
            elif ch == "}" and frame.key is None:
                self._close()
            else:
                self._reset()
        elif frame.expect == "colon":
            if ch == ":":
                frame.expect = "value"
            else:
                self._reset()
        else:   # comma
            if ch == ",":
                frame.expect = "key" if frame.is_object else "value"
            elif ch == ("}" if frame.is_object else "]"):
                self._close()
            else:
                self._reset()

    def _start_string(self, is_key: bool) -> None:
        self.in_string, self.escape, self.string_is_key = True, False, is_key
        self.token_start, self.token = self.pos, '"'

    def _child(self, frame: _Frame) -> str:
        if frame.is_object:
            return f"{frame.pointer}/{escape_token(str(frame.key))}"
        return f"{frame.pointer}/{frame.index}"

    def _advance(self, frame: _Frame) -> None:
        if frame.is_object:
            frame.expect = "comma"
        else:
            frame.index += 1
            frame.expect = "comma"

    def _close(self) -> None:
        self.stack.pop()
        if self.stack:
            self._advance(self.stack[-1])

    def _reset(self) -> None:
        self.stack.clear()
        self.token, self.token_start, self.in_string = "", -1, False


def _find_open(text: str, start: int) -> int:
    a, b = text.find("{", start), text.find("[", start)
    if a < 0:
        return b
    return a if b < 0 else min(a, b)


# -- enforce: pin asserted keys in the requested schema -----------------------------------------

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
