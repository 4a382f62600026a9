"""Who reads a trace (issue 20, leak 1): the key that made the request or the admin key; any
other key gets the 404 of an unknown id; without API keys traces are off unless `traces=True`;
a blocked choice's tokens are shown to the admin key only, and written to `trace_dir` only with
`trace_withheld`. Through the openai SDK and httpx against a live server on a scripted engine."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.config import GatewayConfig
from tests.gateway.conftest import LiveServer
from tests.gateway.test_guard_server import ScriptedEngine

MODEL = "smollm2-135m-instruct"
KEY_A, KEY_B, ADMIN = "key-of-alice", "key-of-bob", "admin-key"
ASK = [{"role": "user", "content": "Go."}]
PASSING = "Nothing to see here. All fine."
BLOCKED = "Fine start. Then SECRET-0042 leaks out."
GUARD = {"guard_mode": "block", "guard_checks": {"deny": [r"SECRET-\d{4}"]}}


@pytest.fixture()
def start(fake_server: Any) -> Any:
    """start(**config) -> a live server on a ScriptedEngine (`server.engine`)."""
    return lambda **config: fake_server(GatewayConfig(**config), engine_cls=ScriptedEngine)


def ask(server: LiveServer, key: str, text: str, **kwargs: Any) -> Any:
    server.engine.script(text)  # type: ignore[attr-defined]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100, **kwargs)


def get_trace(server: LiveServer, trace_id: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.get(f"{server.url}/v1/traces/{trace_id}", headers=headers, timeout=30)


def script_ids(server: LiveServer, text: str) -> list[int]:
    tok = server.engine.tokenizer  # type: ignore[attr-defined]
    return list(tok(text, add_special_tokens=False).input_ids) + [tok.eos_token_id]


def is_withheld_prefix(server: LiveServer, ids: list[int]) -> bool:
    """`ids` run from the start of BLOCKED through its secret (where the guard stopped it)."""
    script = script_ids(server, BLOCKED)
    secret_end = len(server.engine.tokenizer(  # type: ignore[attr-defined]
        BLOCKED[:BLOCKED.index("SECRET") + 11], add_special_tokens=False).input_ids)
    return ids == script[:len(ids)] and len(ids) >= secret_end


def assert_no_withheld_tokens(body: str, ids: list[int]) -> None:
    """Neither the blocked text nor any run of three of its token ids is anywhere in `body`."""
    assert "SECRET-0042" not in body and "leaks out" not in body
    for k in range(len(ids) - 2):
        assert ",".join(map(str, ids[k:k + 3])) not in body.replace(" ", "")


def test_a_trace_is_read_by_its_own_key_only(start):
    server = start(api_keys=(KEY_A, KEY_B), admin_key=ADMIN, **GUARD)
    out = ask(server, KEY_A, PASSING)
    own = get_trace(server, out.id, KEY_A)
    assert own.status_code == 200
    assert own.json()["choices"][0]["completion_ids"] == script_ids(server, PASSING)
    unknown = get_trace(server, "chatcmpl-nope", KEY_B)
    other = get_trace(server, out.id, KEY_B)
    # the same 404 as an unknown id: nothing tells Bob that Alice's trace exists
    assert other.status_code == unknown.status_code == 404
    assert other.json() == json.loads(unknown.text.replace("chatcmpl-nope", out.id))
    assert "completion_ids" not in other.text and "prompt_ids" not in other.text
    assert get_trace(server, out.id, None).status_code == 401
    assert get_trace(server, out.id, "not-a-key").status_code == 401
    # the admin key opens traces, and nothing else that takes an API key
    assert get_trace(server, out.id, ADMIN).json()["id"] == out.id
    with pytest.raises(openai.AuthenticationError):
        ask(server, ADMIN, PASSING)


@pytest.mark.parametrize("stream", [False, True])
def test_a_blocked_choice_is_redacted_for_its_own_key(start, stream):
    server = start(api_keys=(KEY_A, KEY_B), admin_key=ADMIN, **GUARD)
    out = ask(server, KEY_A, BLOCKED, stream=stream)
    if stream:
        chunks = list(out)
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        trace_id = chunks[-1].id
    else:
        assert out.choices[0].finish_reason == "content_filter"
        trace_id = out.id
    admin = get_trace(server, trace_id, ADMIN).json()
    (full,) = admin["choices"]
    ids = full["completion_ids"]     # generation stops at the block: a prefix of the script
    assert is_withheld_prefix(server, ids) and len(full["logprobs"]) == len(ids)
    assert not full["redacted"] and full["finish_reason"] == "content_filter"
    r = get_trace(server, trace_id, KEY_A)
    assert r.status_code == 200
    trace = r.json()
    (choice,) = trace["choices"]
    assert choice["redacted"] and choice["completion_ids"] is None and choice["logprobs"] is None
    # verdict, offsets, lengths and counts stay
    assert choice["num_completion_tokens"] == len(ids) == full["num_completion_tokens"]
    assert trace["checks"] == admin["checks"] and trace["checks"][0]["blocked"]
    (violation,) = trace["checks"][0]["violations"]
    assert violation["check"] == "deny" and violation["end"] - violation["start"] == 11
    assert trace["prompt_ids"] == admin["prompt_ids"]     # the caller's own prompt
    assert_no_withheld_tokens(r.text, ids[4:])


def test_trace_dir_redacts_withheld_choices_unless_trace_withheld(start, tmp_path: Path):
    for keep in (False, True):
        trace_dir = tmp_path / str(keep)
        server = start(api_keys=(KEY_A,), trace_dir=str(trace_dir), trace_withheld=keep, **GUARD)
        blocked = ask(server, KEY_A, BLOCKED)
        passed = ask(server, KEY_A, PASSING)
        server.stop()       # the trace is written when its response closes
        text = (trace_dir / "traces.jsonl").read_text()
        lines = {t["id"]: t for t in map(json.loads, text.splitlines())}
        assert lines[passed.id]["choices"][0]["completion_ids"] == script_ids(server, PASSING)
        choice = lines[blocked.id]["choices"][0]
        assert choice["num_completion_tokens"] > 4
        if keep:
            assert is_withheld_prefix(server, choice["completion_ids"])
            assert choice["num_completion_tokens"] == len(choice["completion_ids"])
        else:
            assert choice["redacted"] and choice["completion_ids"] is None
            assert_no_withheld_tokens(text, script_ids(server, BLOCKED)[4:])
        assert KEY_A not in text    # the owner is never written, nor the key


def test_without_api_keys_traces_are_off_by_default(start, tmp_path: Path):
    server = start(trace_dir=str(tmp_path / "t"), **GUARD)
    out = ask(server, "unused", PASSING)
    r = get_trace(server, out.id, None)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "traces_disabled" and "--traces" in error["message"]
    assert "--api-key" in error["message"]
    assert len(server.runtime.traces) == 0             # nothing recorded...
    assert not (tmp_path / "t" / "traces.jsonl").exists()    # ...nor written


def test_without_api_keys_traces_on_with_the_flag_are_open_but_redacted(start):
    server = start(traces=True, admin_key=ADMIN, **GUARD)
    out = ask(server, "unused", PASSING)
    assert get_trace(server, out.id, None).json()["choices"][0]["completion_ids"]
    blocked = ask(server, "unused", BLOCKED)
    anyone = get_trace(server, blocked.id, None)
    assert anyone.json()["choices"][0]["redacted"]
    assert_no_withheld_tokens(anyone.text, script_ids(server, BLOCKED)[4:])
    admin = get_trace(server, blocked.id, ADMIN).json()
    assert is_withheld_prefix(server, admin["choices"][0]["completion_ids"])


def test_cli_trace_and_override_flags():
    import argparse

    from gateway.cli import _add_serve, config_from_args

    parser = argparse.ArgumentParser()
    _add_serve(parser.add_subparsers())
    config = config_from_args(parser.parse_args(["serve"]))
    assert not (config.traces or config.trace_withheld or config.guard_client_override)
    assert not config.traces_enabled
    config = config_from_args(parser.parse_args(
        ["serve", "--traces", "--trace-withheld", "--guard-client-override"]))
    assert config.traces and config.trace_withheld and config.guard_client_override
    assert config.traces_enabled
    assert config_from_args(parser.parse_args(["serve", "--api-key", "k"])).traces_enabled
