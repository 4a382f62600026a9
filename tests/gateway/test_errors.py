"""Every error path, against a live server backed by the fake engine (fast, deterministic)."""
from __future__ import annotations

import importlib.util
import json
import threading

import httpx
import openai
import pytest

from gateway.app import begin_drain, create_app
from gateway.config import GatewayConfig
from tests.gateway.conftest import FakeEngine, LiveServer, sse_events, wait_for

MODEL = "smollm2-135m-instruct"
USER = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return {"model": MODEL, "messages": USER, "max_tokens": 4, **kw}


@pytest.fixture()
def server(fake_server):
    return fake_server()


def assert_error(r: httpx.Response, status: int, param: str | None = None, text: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    assert text.lower() in err["message"].lower(), err
    assert "Traceback" not in r.text
    return err


@pytest.mark.parametrize("body, param, text", [
    (chat(temperature="1"), "temperature", "valid number"),
    (chat(temperature=-1), "temperature", "greater than or equal"),
    (chat(max_tokens=True), "max_tokens", ""),
    (chat(n=0), "n", ""),
    (chat(top_p=0), "top_p", ""),
    (chat(top_k=-3), "top_k", "top_k"),
    (chat(stop=""), "stop", "non-empty"),
    ({"messages": USER}, "model", "required"),
    (chat(messages=[]), "messages", ""),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", ""),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", ""),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages", "not supported"),
    (chat(messages=[{"role": "user", "content": "\ud800"}]), "messages[0].content", "utf-8"),
    (chat(messages=[{"role": "user", "content": "word " * 600}]), "messages", "context"),
    (chat(max_tokens=100000), "max_tokens", "context"),
    (chat(top_logprobs=2), "top_logprobs", "logprobs"),
    (chat(logprobs=True, top_logprobs=50), "top_logprobs", ""),
    (chat(logit_bias={"1": 500}), "logit_bias", "[-100, 100]"),
    (chat(logit_bias={"x": 5}), "logit_bias", "token ids"),
    (chat(logit_bias={"99999999": 5}), "logit_bias", "token ids"),
    (chat(min_tokens=50, max_tokens=10), "min_tokens", "max_tokens"),
    (chat(allowed_token_ids=[10**9]), "allowed_token_ids", "token ids"),
    (chat(allowed_token_ids=[1], response_format={"type": "json_object"}), "allowed_token_ids",
     "grammar"),
    (chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": 12}}}), "response_format.json_schema.schema", "schema"),
    (chat(response_format={"type": "yaml"}), "response_format", ""),
    (chat(tools=[{"type": "function", "function": {"name": "f"}},
                 {"type": "function", "function": {"name": "f"}}]), "tools[1].function.name",
     "duplicate"),
    (chat(tools=[{"type": "function", "function": {"name": "f g"}}]), "tools[0].function.name", ""),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     "tools[0].function.parameters", "object"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": 3}}}}}]), "tools[0].function.parameters", ""),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}],
          structured_outputs={"regex": "a+"}), "tools", "JSON response format only"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}], parallel_tool_calls=1),
     "parallel_tool_calls", ""),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}],
          tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice", "unknown"),
    (chat(tool_choice="required"), "tool_choice", "requires tools"),
    (chat(structured_outputs={"regex": "(unclosed"}), "structured_outputs", ""),
    (chat(guided_choice=[]), "guided_choice", ""),
    (chat(stop_token_ids=[10**9]), "stop_token_ids", ""),
    (chat(plumbline={"close_reserve": -1}), "plumbline.close_reserve", "greater than or equal"),
    (chat(plumbline={"close_reserve": "8"}), "plumbline.close_reserve", "integer"),
    (chat(plumbline={"close_reserve": 2.5}), "plumbline.close_reserve", "integer"),
    (chat(plumbline={"close_reserve": True}), "plumbline.close_reserve", "integer"),
    (chat(plumbline={"grammar_backend": "guidance"}), "plumbline.grammar_backend", "unknown grammar backend"),
    (chat(plumbline={"grammar_backend": 3}), "plumbline.grammar_backend", ""),
    pytest.param(chat(plumbline={"grammar_backend": "outlines"}, response_format={"type": "json_object"}),
                 "plumbline.grammar_backend", "not installed", marks=pytest.mark.skipif(
                     importlib.util.find_spec("outlines_core") is not None, reason="outlines-core installed")),
    pytest.param(chat(plumbline={"grammar_backend": "xgrammar"}), "plumbline.grammar_backend", "not installed",
                 marks=pytest.mark.skipif(importlib.util.find_spec("xgrammar") is not None,
                                          reason="xgrammar installed")),
    (chat(n=9), "n", ""),
])
def test_bad_chat_requests_are_400_naming_the_parameter(server, body, param, text):
    # json.dumps escapes non-ASCII, so a lone surrogate travels as "\\ud800", as clients send it
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body))
    assert_error(r, 400, param, text)


@pytest.mark.parametrize("body, param, text", [
    ({"model": MODEL, "prompt": []}, "prompt", "empty"),
    ({"model": MODEL, "prompt": [[1, 2], [3, 10**9]]}, "prompt", "token ids"),
    ({"model": MODEL, "prompt": ["a", ""]}, "prompt", "empty"),
    ({"model": MODEL, "prompt": "a", "suffix": "b"}, "suffix", ""),
    ({"model": MODEL, "prompt": ""}, "prompt", "empty"),
    ({"model": MODEL, "prompt": [1, 10**9]}, "prompt", "token ids"),
    ({"model": MODEL, "prompt": "a", "logprobs": 21}, "logprobs", ""),
])
def test_bad_completion_requests_are_400(server, body, param, text):
    assert_error(httpx.post(server.url + "/v1/completions", json=body), 400, param, text)


def test_malformed_bodies(server):
    url = server.url + "/v1/chat/completions"
    assert_error(httpx.post(url, content=b"{not json"), 400, text="not valid JSON")
    assert_error(httpx.post(url, content=b'{"model": "\xff\xfe"}'), 400, text="UTF-8")
    assert_error(httpx.post(url, content=b"[1, 2]"), 400, text="JSON object")
    assert_error(httpx.post(url, content=b'{"model": NaN}'), 400, text="NaN")


def test_not_found_method_and_size(server):
    assert_error(httpx.post(server.url + "/v1/chat/completions", json=chat(model="gpt-9")),
                 404, "model", "does not exist")
    assert_error(httpx.get(server.url + "/v1/models/gpt-9"), 404, "model")
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * 5_000_000}]))
    assert_error(httpx.post(server.url + "/v1/chat/completions", content=big), 413)


def test_sdk_maps_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=-1)
    assert exc.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)


def test_auth(fake_server):
    server = fake_server(GatewayConfig(api_keys=("k1", "k2")))
    url = server.url + "/v1/models"
    assert_error(httpx.get(url), 401, text="API key")
    assert_error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(url, headers={"Authorization": "Bearer k2"}).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="bad", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key="k1", max_retries=0)
    out = good.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
    assert out.choices[0].message.content


def test_queue_full_is_429_with_retry_after_and_queued_requests_still_finish(fake_server):
    hold = threading.Event()
    server = fake_server(GatewayConfig(max_queued_requests=1), max_num_seqs=1, hold=hold)
    with httpx.Client(base_url=server.url, timeout=30) as c1, \
            httpx.Client(base_url=server.url, timeout=30) as c2:
        with c1.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as running:
            wait_for(lambda: server.engine.num_running == 1, what="first request running")
            with c2.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as queued:
                wait_for(lambda: server.runtime.admission.num_waiting == 1, what="one queued")
                r = httpx.post(server.url + "/v1/chat/completions", json=chat())
                err = assert_error(r, 429, text="capacity")
                assert err["type"] == "rate_limit_error" and r.headers["Retry-After"] == "1"
                client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    client.chat.completions.create(model=MODEL, messages=USER)
                hold.set()
                for resp in (running, queued):
                    events = sse_events(resp.iter_lines())
                    assert events[-1] == "[DONE]"
                    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert server.runtime.admission.num_in_use == 0


def test_keepalive_pings_while_waiting(fake_server):
    hold = threading.Event()
    server = fake_server(GatewayConfig(keepalive_interval_s=0.05), hold=hold)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat(stream=True)) as r:
        lines = r.iter_lines()
        seen = []
        for line in lines:
            seen.append(line)
            if seen.count(": ping") >= 2:
                break
        hold.set()
        events = sse_events(iter(seen + list(lines)))
    assert ": ping" in events and events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events
                   if isinstance(e, dict) and e["choices"])
    assert text.startswith("Hello")


def test_engine_error_mid_stream_is_one_error_event_then_done(fake_server):
    server = fake_server(fail_after=2)
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json=chat(stream=True, max_tokens=8)) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert set(events[-2]) == {"error"} and events[-2]["error"]["type"] == "server_error"
    # the same failure without streaming is a 500 in OpenAI's shape
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(max_tokens=8))
    assert_error(r, 500)
    # and the server goes on serving
    assert httpx.post(server.url + "/v1/completions",
                      json={"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code == 200


def test_disconnect_aborts_the_request(fake_server):
    hold = threading.Event()
    server = fake_server(hold=hold)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat(stream=True)) as r:
        next(r.iter_lines())
        wait_for(lambda: server.engine.requests, what="request in the engine")
    (request_id,) = server.engine.requests
    wait_for(lambda: request_id in server.engine.aborted, what="abort after disconnect")
    wait_for(lambda: server.runtime.admission.num_in_use == 0, what="slot released")


def test_request_id_is_echoed_or_generated(server):
    r = httpx.get(server.url + "/v1/models", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = httpx.get(server.url + "/v1/models", headers={"X-Request-Id": "bad id\twith junk"})
    assert r.headers["x-request-id"] != "bad id\twith junk" and len(r.headers["x-request-id"]) == 32


def test_models_metrics_and_openapi(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert httpx.get(server.url + f"/v1/models/{MODEL}").json()["id"] == MODEL
    httpx.post(server.url + "/v1/chat/completions", json=chat())
    text = httpx.get(server.url + "/metrics").text
    for name in ("plumbline:time_to_first_token_seconds_bucket", "plumbline:e2e_request_latency",
                 "plumbline:inter_token_latency_seconds", "plumbline:request_queue_time_seconds",
                 "plumbline:num_requests_running", "plumbline:num_requests_waiting",
                 "plumbline:kv_cache_usage_perc", "plumbline:num_forced_tokens",
                 "plumbline:prompt_tokens_total",
                 "plumbline:generation_tokens_total", "plumbline:request_success_total",
                 'plumbline:http_requests_total{route="/v1/chat/completions",status="200"}'):
        assert name in text, name
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]
    assert "messages" in spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]


def test_not_ready_while_loading(tokenizer):
    release = threading.Event()

    def slow_factory(_config):
        release.wait(30)
        return FakeEngine(tokenizer)

    server = LiveServer(create_app(GatewayConfig(), engine_factory=slow_factory))
    server.start(wait_ready=False)
    try:
        assert httpx.get(server.url + "/health").status_code == 200
        assert_error(httpx.get(server.url + "/ready"), 503, text="loading")
        assert_error(httpx.post(server.url + "/v1/chat/completions", json=chat()), 503)
        release.set()
        wait_for(lambda: httpx.get(server.url + "/ready").status_code == 200, what="ready")
    finally:
        release.set()
        server.stop()


def test_drain_refuses_new_requests_and_aborts_stragglers(fake_server):
    hold = threading.Event()
    server = fake_server(GatewayConfig(drain_timeout_s=0.2), hold=hold)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat(stream=True)) as r:
        lines = r.iter_lines()
        next(lines)
        wait_for(lambda: server.runtime.active, what="request in the engine")
        server.call(begin_drain, server.runtime)      # what the CLI does on SIGTERM
        assert_error(httpx.post(server.url + "/v1/chat/completions", json=chat()), 503,
                     text="shutting down")
        assert_error(httpx.get(server.url + "/ready"), 503)
        events = sse_events(lines)
    assert events[-1] == "[DONE]" and "shutting down" in events[-2]["error"]["message"]

