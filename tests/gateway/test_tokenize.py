"""POST /tokenize and /detokenize in vLLM's shapes, against the fake engine (a real tokenizer)."""
from __future__ import annotations

import json

import httpx
import pytest

from gateway.config import GatewayConfig

MODEL = "smollm2-135m-instruct"
USER = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture()
def server(fake_server):
    return fake_server()


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    # json.dumps escapes a lone surrogate as "\\ud800", as clients send it
    return httpx.post(server.url + path, content=json.dumps(body), **kw)


def test_prompt_round_trip(server, tokenizer):
    r = post(server, "/tokenize", {"model": MODEL, "prompt": "Hello, world!"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["tokens"] == tokenizer("Hello, world!").input_ids
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
    assert body["token_strs"] is None
    r = post(server, "/detokenize", {"model": MODEL, "tokens": body["tokens"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": "Hello, world!"}


def test_model_is_optional_and_token_strs_on_request(server, tokenizer):
    body = post(server, "/tokenize", {"prompt": "one two", "return_token_strs": True}).json()
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    assert post(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


def test_chat_form_counts_what_the_chat_route_prompts(server, tokenizer):
    # the chat route's usage.prompt_tokens is the count a token counter must predict
    body = post(server, "/tokenize", {"model": MODEL, "messages": USER}).json()
    expected = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == tokenizer(expected, add_special_tokens=False).input_ids
    chat = post(server, "/v1/chat/completions", {"model": MODEL, "messages": USER,
                                                "max_tokens": 2}).json()
    assert chat["usage"]["prompt_tokens"] == body["count"]
    text = post(server, "/detokenize", {"tokens": body["tokens"]}).json()["prompt"]
    assert text == expected


def test_chat_form_without_generation_prompt(server, tokenizer):
    with_prompt = post(server, "/tokenize", {"messages": USER}).json()
    without = post(server, "/tokenize", {"messages": USER, "add_generation_prompt": False}).json()
    expected = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=False)
    assert without["tokens"] == tokenizer(expected, add_special_tokens=False).input_ids
    assert without["count"] < with_prompt["count"]
    assert with_prompt["tokens"][:without["count"]] == without["tokens"]


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/tokenize", {"prompt": "x", "model": "gpt-9"}, "model"),
    ("/tokenize", {"messages": USER, "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ("/tokenize", {"messages": USER, "continue_final_message": True}, "continue_final_message"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/detokenize", {}, "tokens"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens[1]"),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_errors_are_openai_errors_naming_the_field(server, path, body, param):
    r = post(server, path, body)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    if param == "model":
        assert r.status_code == 404
    else:
        assert r.status_code == 400


def test_unknown_field_is_ignored_with_the_header(server):
    r = post(server, "/tokenize", {"prompt": "x", "frobnicate": 1})
    assert r.status_code == 200 and r.headers["x-plumbline-ignored"] == "frobnicate"


def test_behind_the_api_key(fake_server):
    server = fake_server(GatewayConfig(api_keys=("k1",)))
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        assert post(server, path, body).status_code == 401
        r = post(server, path, body, headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200, r.text
