"""Request fields the models do not declare: OpenAI's and vLLM's accepted (ignored or refused by
gateway/fields.py), unknown ones ignored with a warning and a header, or a 400 when strict."""
from __future__ import annotations

import httpx
import openai
import pytest
from structlog.testing import capture_logs

from gateway.config import GatewayConfig
from gateway.fields import IGNORED, REFUSED
from tests.gateway.conftest import sdk_client
from tests.gateway.test_errors import MODEL, USER, chat


@pytest.fixture()
def server(fake_server):
    return fake_server()


# What current OpenAI clients send, each with a realistic value: all accepted (200), none
# reported as unknown.
OPENAI_FIELDS = {
    "reasoning_effort": "low", "prediction": {"type": "content", "content": "hi"},
    "verbosity": "low", "prompt_cache_key": "k", "safety_identifier": "u-1", "store": False,
    "metadata": {"a": "b"}, "service_tier": "auto", "modalities": ["text"], "audio": None,
    "web_search_options": None, "user": "u", "parallel_tool_calls": True,
    "prompt_cache_retention": "24h",
}


@pytest.mark.parametrize("name, value", OPENAI_FIELDS.items())
def test_openai_fields_are_accepted_through_the_sdk(server, name, value):
    resp = sdk_client(server).chat.completions.with_raw_response.create(
        model=MODEL, messages=USER, max_tokens=4, extra_body={name: value})
    assert resp.http_response.status_code == 200
    assert "x-plumbline-ignored" not in resp.headers
    assert resp.parse().choices[0].message.content


@pytest.mark.parametrize("name, value", [
    ("priority", 3), ("request_id", "r"), ("length_penalty", 1.0), ("kv_transfer_params", None),
    ("continue_final_message", False), ("chat_template_kwargs", {}), ("use_beam_search", False),
    ("spaces_between_special_tokens", True),
])
def test_vllm_extras_with_neutral_values_are_accepted(server, name, value):
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(**{name: value}))
    assert r.status_code == 200, r.text
    assert "x-plumbline-ignored" not in r.headers


def test_continuous_usage_stats_is_accepted(server):
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", chat(modalities=["text", "audio"]), "modalities"),
    ("/v1/chat/completions", chat(audio={"voice": "alloy", "format": "wav"}), "audio"),
    ("/v1/chat/completions", chat(web_search_options={}), None),   # {} is neutral
    ("/v1/chat/completions", chat(web_search_options={"search_context_size": "low"}),
     "web_search_options"),
    ("/v1/chat/completions", chat(functions=[{"name": "f"}]), "functions"),
    ("/v1/chat/completions", chat(continue_final_message=True), "continue_final_message"),
    ("/v1/chat/completions", chat(use_beam_search=True), "use_beam_search"),
    ("/v1/chat/completions", chat(use_beam_search=1), "use_beam_search"),   # 1 is not False
    ("/v1/chat/completions", chat(echo=True), "echo"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "response_format": {"type": "json_object"}},
     "response_format"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "tools": []}, "tools"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "cache_salt": "s"}, "cache_salt"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "add_special_tokens": False},
     "add_special_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2,
                         "add_special_tokens": True}, None),
    ("/v1/chat/completions", chat(add_special_tokens=True), "add_special_tokens"),
    ("/v1/chat/completions", chat(add_special_tokens=False), None),
])
def test_fields_that_would_change_the_output_are_refused(server, path, body, param):
    r = httpx.post(server.url + path, json=body)
    if param is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_unknown_field_is_ignored_with_header_and_log(server):
    with capture_logs() as logs:
        r = httpx.post(server.url + "/v1/chat/completions", json=chat(frobnicate=1, zork=[1]))
    assert r.status_code == 200, r.text
    assert r.headers["x-plumbline-ignored"] == "frobnicate,zork"
    warned = [e for e in logs if e["event"] == "request_fields_ignored"]
    assert warned and warned[0]["fields"] == ["frobnicate", "zork"]
    assert warned[0]["log_level"] == "warning"


def test_unknown_field_on_a_stream_and_on_completions(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json=chat(stream=True, frobnicate=1)) as r:
        assert r.status_code == 200 and r.headers["x-plumbline-ignored"] == "frobnicate"
        r.read()
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": MODEL, "prompt": "a", "max_tokens": 2, "frobnicate": 1})
    assert r.status_code == 200 and r.headers["x-plumbline-ignored"] == "frobnicate"


def test_odd_field_names_cannot_break_the_header(server):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json=chat(**{"a\r\nx-evil: 1": 1, "é": 2}))
    assert r.status_code == 200, r.text
    assert r.headers["x-plumbline-ignored"] == "a%0D%0Ax-evil%3A%201,%C3%A9"
    assert "x-evil" not in r.headers
    # names of the model's own attributes are plain unknown fields
    r = httpx.post(server.url + "/v1/chat/completions",
                   json=chat(stop_strings=1, model_config=2, __class__=3))
    assert r.status_code == 200, r.text
    assert r.headers["x-plumbline-ignored"] == "stop_strings,model_config,__class__"
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(**{f"f{i}": i for i in range(500)}))
    assert r.status_code == 200 and r.headers["x-plumbline-ignored"].count(",") == 31
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(**{"k" * 100_000: 1}))
    assert r.status_code == 200 and r.headers["x-plumbline-ignored"] == "k" * 61 + "..."


def test_known_fields_set_no_header(server):
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(top_k=5, seed=1))
    assert r.status_code == 200 and "x-plumbline-ignored" not in r.headers


def test_strict_fields_refuses_unknown_fields(fake_server):
    server = fake_server(GatewayConfig(strict_fields=True))
    client = sdk_client(server)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=USER, extra_body={"frobnicate": 1})
    assert exc.value.body["param"] == "frobnicate"
    assert "unknown field" in exc.value.body["message"]
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": MODEL, "prompt": "a", "frobnicate": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
    # what OpenAI's and vLLM's APIs define is still accepted when strict
    r = httpx.post(server.url + "/v1/chat/completions",
                   json=chat(reasoning_effort="low", priority=1, store=True))
    assert r.status_code == 200, r.text


def test_add_generation_prompt_false_changes_the_prompt(server):
    with_prompt = httpx.post(server.url + "/v1/chat/completions", json=chat()).json()
    without = httpx.post(server.url + "/v1/chat/completions",
                         json=chat(add_generation_prompt=False)).json()
    assert without["usage"]["prompt_tokens"] < with_prompt["usage"]["prompt_tokens"]


def test_tables_do_not_overlap():
    assert not set(IGNORED) & set(REFUSED)
