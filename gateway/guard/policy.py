"""The guard's policy: its mode, how held text is released, and which checks run with what
settings; the server default (`--guard-mode`, the checks file) and a request's override of it.

The server's policy is a floor: a request may tighten it (a stricter mode, a later release,
more checks or deny patterns), never loosen it, unless the operator lets clients choose freely
(`--guard-client-override`). Otherwise any client could switch off the guard its operator set.

Each check's accepted settings are validated here rather than next to the check, so that what
a client may ask for is read in one place; a bad value is a `PolicyError` naming the field.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from gateway.guard.checks import CHECKS

GuardMode = Literal["off", "flag", "block"]
ReleaseMode = Literal["stream", "unit", "final"]
# Least to most strict: "unit" holds what "stream" would send, "final" holds everything.
_MODE_ORDER: tuple[str, ...] = ("off", "flag", "block")
_RELEASE_ORDER: tuple[str, ...] = ("stream", "unit", "final")
_CONSISTENCY_ORDER: tuple[str, ...] = ("off", "detect", "enforce")


class PolicyError(ValueError):
    """A bad `plumbline.guard` object: `param` names the field, for the 400."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param, self.message = param, message


@dataclass(frozen=True, slots=True)
class Policy:
    mode: GuardMode = "off"
    release: ReleaseMode = "unit"
    checks: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("off", "flag", "block"):
            raise PolicyError("guard.mode", "mode must be one of 'off', 'flag', 'block'")
        if self.release not in ("stream", "unit", "final"):
            raise PolicyError("guard.release", "release must be one of 'stream', 'unit', 'final'")

    @property
    def consistency_mode(self) -> str:
        return str(self.checks.get("consistency") or "off")


DEFAULT_CHECKS: dict[str, Any] = {"schema": True, "tool_args": True, "truncation": True,
                                  "deny": [], "arithmetic": False, "consistency": "off"}


# -- check settings: validate(value, param) -> the setting in force ----------------------------

def _bool(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(param, f"{param} must be true or false")
    return value


def _deny_setting(value: Any, param: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise PolicyError(param, f"{param} must be a list of regular expressions")
    for p in value:
        try:
            re.compile(p)
        except re.error as e:
            raise PolicyError(param, f"{param}: invalid regular expression {p!r}: {e}") from None
    return value


def _consistency_setting(value: Any, param: str) -> str:
    if value is True:
        return "detect"
    if value is False:
        return "off"
    if value not in ("off", "detect", "enforce"):
        raise PolicyError(param, f"{param} must be one of 'off', 'detect', 'enforce'")
    return str(value)


def _as_is(value: Any, param: str) -> Any:
    return value


CHECK_SETTINGS: dict[str, Callable[[Any, str], Any]] = {
    "schema": _bool, "tool_args": _bool, "truncation": _bool, "deny": _deny_setting,
    "arithmetic": _bool, "consistency": _consistency_setting}


def validate_checks(checks: Any, param: str) -> dict[str, Any]:
    if not isinstance(checks, dict):
        raise PolicyError(param, f"{param} must be an object from check names to settings")
    out = {}
    for name, value in checks.items():
        if name not in CHECKS:
            raise PolicyError(f"{param}.{name}",
                              f"unknown check {name!r}; known: {', '.join(CHECKS)}")
        out[name] = CHECK_SETTINGS.get(name, _as_is)(value, f"{param}.{name}")
    return out


def server_policy(mode: str = "off", release: str = "unit",
                  checks: dict[str, Any] | None = None) -> Policy:
    """The server default: `--guard-mode` and the checks config file, over `DEFAULT_CHECKS`."""
    merged = {**DEFAULT_CHECKS, **validate_checks(checks or {}, "checks")}
    return Policy(mode, release, merged)  # type: ignore[arg-type]


def merge_policy(server: Policy, override: Any, param: str = "plumbline.guard",
                 may_loosen: bool = False) -> Policy:
    """The request's `plumbline.guard` over the server default; PolicyError names the bad field,
    including any attempt to loosen the server's policy unless `may_loosen`."""
    if override is None:
        return server
    if not isinstance(override, dict):
        raise PolicyError(param, f"{param} must be an object")
    unknown = set(override) - {"mode", "release", "checks"}
    if unknown:
        raise PolicyError(f"{param}.{sorted(unknown)[0]}",
                          f"unknown field {sorted(unknown)[0]!r}; known: mode, release, checks")
    mode = override.get("mode", server.mode)
    if mode not in ("off", "flag", "block"):
        raise PolicyError(f"{param}.mode", f"{param}.mode must be one of 'off', 'flag', 'block'")
    release = override.get("release", server.release)
    if release not in ("stream", "unit", "final"):
        raise PolicyError(f"{param}.release",
                          f"{param}.release must be one of 'stream', 'unit', 'final'")
    checks = dict(server.checks)
    requested = override.get("checks", {})
    deny = requested.get("deny", []) if isinstance(requested, dict) else []
    if deny is False or deny is None:   # the check off, the server's patterns too (floor: 400)
        requested = {k: v for k, v in requested.items() if k != "deny"}
        checks["deny"] = []
    for name, value in validate_checks(requested, f"{param}.checks").items():
        if name == "deny":   # server patterns always apply; the request adds its own
            checks[name] = list(checks.get("deny") or []) + value
        else:
            checks[name] = value
    policy = Policy(mode, release, checks)
    if not may_loosen:
        check_floor(server, policy, param)
    return policy


def check_floor(server: Policy, policy: Policy, param: str = "plumbline.guard") -> None:
    """PolicyError unless `policy` is at least as strict as `server` on every setting that runs."""
    if server.mode == "off":
        return      # nothing runs: whatever a request asks for is tighter
    if _MODE_ORDER.index(policy.mode) < _MODE_ORDER.index(server.mode):
        raise PolicyError(f"{param}.mode", _floor_message(
            f"{param}.mode", f"lower the mode from {server.mode!r} to {policy.mode!r}"))
    # release only shapes block mode; a flag server sends everything as generated anyway
    if (server.mode == "block"
            and _RELEASE_ORDER.index(policy.release) < _RELEASE_ORDER.index(server.release)):
        raise PolicyError(f"{param}.release", _floor_message(
            f"{param}.release", f"release more eagerly ({policy.release!r}) than the server's "
            f"{server.release!r}"))
    for name, value in server.checks.items():
        if name == "deny":
            if not set(value or ()) <= set(policy.checks.get("deny") or ()):
                raise PolicyError(f"{param}.checks.deny", _floor_message(
                    f"{param}.checks.deny", "drop the server's deny patterns (a request may "
                    "add its own)"))
        elif _strictness(name, policy.checks.get(name)) < _strictness(name, value):
            raise PolicyError(f"{param}.checks.{name}", _floor_message(
                f"{param}.checks.{name}", f"set {name!r} to {policy.checks.get(name)!r} below "
                f"the server's {value!r}"))


def _strictness(name: str, value: Any) -> int:
    if name == "consistency":
        setting = _consistency_setting("off" if value is None else value, name)
        return _CONSISTENCY_ORDER.index(setting)
    return int(bool(value))      # booleans and registered checks' settings: on beats off


def _floor_message(field: str, attempt: str) -> str:
    return (f"{field}: a request may tighten this server's guard policy, not {attempt}; "
            "the operator can let clients choose with --guard-client-override")
