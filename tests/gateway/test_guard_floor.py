"""The server's guard is a floor (issue 20, leak 6): a request may tighten it (a stricter mode,
a later release, more checks or deny patterns) but never loosen it, a 400 naming the field,
unless the operator passes `--guard-client-override`. Through the openai SDK (extra_body)."""
from __future__ import annotations

from typing import Any, Iterator

import openai
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.gateway.conftest import LiveServer
from tests.gateway.test_guard_server import ScriptedEngine

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Go."}]
LEAKY = "First sentence is fine. Then SECRET-0042 leaks out. More text here."
DROP = "First sentence is fine. Then DROP TABLE users; follows. More text here."
CHECKS = {"deny": [r"SECRET-\d{4}"], "arithmetic": True, "consistency": "detect"}


@pytest.fixture(scope="module")
def servers(tokenizer: Any) -> Iterator[dict[str, LiveServer]]:
    """block: the floor; flag: a lower floor to tighten; open: block with client override."""
    configs = {"block": GatewayConfig(guard_mode="block", guard_checks=CHECKS),
               "flag": GatewayConfig(guard_mode="flag", guard_checks=CHECKS),
               "open": GatewayConfig(guard_mode="block", guard_checks=CHECKS,
                                     guard_client_override=True)}
    live = {}
    for name, config in configs.items():
        engine = ScriptedEngine(tokenizer)
        live[name] = LiveServer(create_app(config, engine_factory=lambda _, e=engine: e)).start()
        live[name].engine = engine  # type: ignore[attr-defined]
    yield live
    for s in live.values():
        s.stop()


def chat(server: LiveServer, text: str, guard: dict[str, Any], stream: bool = False) -> Any:
    server.engine.script(text)  # type: ignore[attr-defined]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200,
                                          stream=stream,
                                          extra_body={"plumbline": {"guard": guard}})


def content(out: Any) -> str:
    return out.choices[0].message.content or ""


@pytest.mark.parametrize("guard, param", [
    ({"mode": "off"}, "plumbline.guard.mode"),
    ({"mode": "flag"}, "plumbline.guard.mode"),
    ({"release": "stream"}, "plumbline.guard.release"),
    ({"mode": "block", "release": "stream"}, "plumbline.guard.release"),
    ({"checks": {"deny": False}}, "plumbline.guard.checks.deny"),
    ({"checks": {"deny": None}}, "plumbline.guard.checks.deny"),
    ({"checks": {"arithmetic": False}}, "plumbline.guard.checks.arithmetic"),
    ({"checks": {"schema": False}}, "plumbline.guard.checks.schema"),
    ({"checks": {"consistency": "off"}}, "plumbline.guard.checks.consistency"),
    ({"mode": "block", "checks": {"tool_args": False}}, "plumbline.guard.checks.tool_args"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_loosening_the_server_policy_is_a_400_naming_the_field(servers, guard, param, stream):
    engine = servers["block"].engine  # type: ignore[attr-defined]
    num_requests = len(engine.requests)
    with pytest.raises(openai.BadRequestError) as err:
        chat(servers["block"], LEAKY, guard, stream)
    error = err.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert "--guard-client-override" in error["message"]
    assert len(engine.requests) == num_requests       # refused before anything was generated


def test_a_flag_server_refuses_off_and_fewer_checks(servers):
    for guard, param in [({"mode": "off"}, "plumbline.guard.mode"),
                         ({"checks": {"deny": False}}, "plumbline.guard.checks.deny")]:
        with pytest.raises(openai.BadRequestError) as err:
            chat(servers["flag"], LEAKY, guard)
        assert err.value.body["param"] == param


def test_the_server_patterns_apply_whatever_deny_list_a_request_sends(servers):
    out = chat(servers["block"], LEAKY, {"checks": {"deny": []}})
    assert out.choices[0].finish_reason == "content_filter" and "SECRET" not in content(out)


def test_tightening_is_allowed_and_enforced(servers):
    # flag -> block: the flag server would have sent the secret; now it is withheld
    out = chat(servers["flag"], LEAKY, {"mode": "block", "release": "stream"})
    assert out.choices[0].finish_reason == "content_filter" and "SECRET" not in content(out)
    # an added deny pattern, on top of the server's
    chunks = list(chat(servers["block"], DROP, {"checks": {"deny": [r"(?i)drop\s+table"]}},
                       stream=True))
    sent = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "DROP" not in sent and chunks[-1].choices[0].finish_reason == "content_filter"
    verdict = (chunks[-1].model_extra or {})["plumbline"]["checks"]
    assert verdict["violations"][0]["check"] == "deny"
    assert chat(servers["block"], LEAKY, {"checks": {"deny": [r"(?i)drop\s+table"]}}) \
        .choices[0].finish_reason == "content_filter"      # the server's pattern still holds
    # a later release, a stricter consistency: allowed, and the text still passes
    out = chat(servers["block"], "All fine here.", {"release": "final",
                                                     "checks": {"consistency": "enforce"}})
    assert content(out) == "All fine here." and out.choices[0].finish_reason == "stop"


def test_with_client_override_a_request_may_loosen(servers):
    out = chat(servers["open"], LEAKY, {"mode": "off"})
    assert content(out) == LEAKY and out.choices[0].finish_reason == "stop"
    out = chat(servers["open"], LEAKY, {"checks": {"deny": False}})
    assert content(out) == LEAKY and (out.model_extra or {})["plumbline"]["checks"]["passed"]
    out = chat(servers["open"], "2 + 2 = 5.", {"release": "stream",
                                                "checks": {"arithmetic": False}})
    assert content(out) == "2 + 2 = 5."
    # and without a guard object the server's policy still applies
    server = servers["open"]
    server.engine.script(LEAKY)  # type: ignore[attr-defined]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200)
    assert out.choices[0].finish_reason == "content_filter"
