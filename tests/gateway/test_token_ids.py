"""`return_token_ids` (vLLM's names: `prompt_token_ids`, each choice's `token_ids`) and the
weights version every response reports, on a live server with the tiny random llama."""
from __future__ import annotations

import httpx
import pytest

from engine import EngineConfig
from gateway.config import GatewayConfig
from tests.gateway.conftest import serve, sse_events

PROMPT = [1, 422, 1234, 77]
MESSAGES = [{"role": "user", "content": "Say something, café 日本"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    config = GatewayConfig(engine=EngineConfig(model=str(tiny_model_dir), max_num_seqs=4,
                                               kv_cache_memory_mb=16), served_model_name="tiny")
    yield from serve(config)


def post(server, path, **body):
    r = httpx.post(server.url + path, json={"model": "tiny", "max_tokens": 12,
                                            "temperature": 0, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, path, **body):
    with httpx.stream("POST", server.url + path, timeout=60, json={
            "model": "tiny", "max_tokens": 12, "temperature": 0, "stream": True, **body}) as r:
        assert r.status_code == 200
        return [e for e in sse_events(r.iter_lines()) if isinstance(e, dict)]


def test_completions_token_ids(server, tokenizer):
    out = post(server, "/v1/completions", prompt=PROMPT, return_token_ids=True, logprobs=0)
    choice = out["choices"][0]
    assert choice["prompt_token_ids"] == PROMPT
    ids = choice["token_ids"]
    assert len(ids) == out["usage"]["completion_tokens"] == len(choice["logprobs"]["tokens"])
    assert tokenizer.decode(ids) == choice["text"]
    assert out["plumbline"]["weights_version"] == 0
    assert "weights_versions" not in out["plumbline"]
    # streamed: the same ids, chunk by chunk, each chunk with the version of its tokens
    chunks = stream(server, "/v1/completions", prompt=PROMPT, return_token_ids=True)
    token_chunks = [c["choices"][0] for c in chunks if c["choices"][0].get("token_ids")]
    assert [t for c in token_chunks for t in c["token_ids"]] == ids
    assert token_chunks[0]["prompt_token_ids"] == PROMPT
    assert all("prompt_token_ids" not in c for c in token_chunks[1:])
    assert all(c["plumbline"] == {"weights_version": 0} for c in token_chunks)


def test_chat_token_ids(server, tokenizer):
    out = post(server, "/v1/chat/completions", messages=MESSAGES, return_token_ids=True)
    prompt_ids = out["prompt_token_ids"]
    assert len(prompt_ids) == out["usage"]["prompt_tokens"]
    assert "café 日本" in tokenizer.decode(prompt_ids)
    ids = out["choices"][0]["token_ids"]
    assert len(ids) == out["usage"]["completion_tokens"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == out["choices"][0]["message"]["content"]
    chunks = stream(server, "/v1/chat/completions", messages=MESSAGES, return_token_ids=True)
    assert chunks[0]["prompt_token_ids"] == prompt_ids
    # every token shows up once, even those whose chunk carried no text (half a character)
    assert [t for c in chunks for t in c["choices"][0].get("token_ids", [])] == ids


def test_without_return_token_ids_no_ids_but_the_version(server):
    out = post(server, "/v1/completions", prompt=PROMPT, n=2, temperature=1.0, seed=5)
    assert all("token_ids" not in c and "prompt_token_ids" not in c for c in out["choices"])
    assert out["plumbline"] == {"weights_version": 0}
    chunks = stream(server, "/v1/chat/completions", messages=MESSAGES)
    assert "prompt_token_ids" not in chunks[0]
    assert not any("token_ids" in c["choices"][0] for c in chunks if c["choices"])
