"""The console without a browser: `GET /v1/stats` and `GET /v1/traces/{id}/tokens` on the fake
engine, the closing-step replay, the page's weight and `--no-ui`."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.ui import STATIC_DIR
from gateway.ui.trace_view import closing_steps
from tests.gateway.conftest import FAKE_TEXT, FakeEngine, LiveServer

KEY, OTHER = "key-a", "key-b"


def test_closing_steps_follow_the_budget_once_a_structure_has_begun() -> None:
    texts = ["Sure ", '{"a": [', "1", ",", "2", ",", "3", "]}"]
    # reserve min(48, 8 // 2) = 4; from token 2 on, the budget left (8 - i) is within the
    # reserve plus the two open brackets; before it, free text is never steered
    assert closing_steps(texts, 8, 48) == [2, 3, 4, 5, 6, 7]
    assert closing_steps(texts, 64, 48) == []          # far from the end
    assert closing_steps(texts, 8, 0) == []            # closing off
    assert closing_steps(texts, None, None) == []      # not recorded
    assert closing_steps(["Just", " words", " here"] * 3, 9, 48) == []
    # tools with "auto": only a tag opens a structure, as in the engine (grammars/closing.py)
    assert closing_steps(texts, 8, 48, free_text=True) == []
    tagged = ["Ok ", "<tool_call>", '{"a": [', "1", "]}"]
    assert closing_steps(tagged, 6, 48, free_text=True) == [3, 4]     # reserve 3 + depth 2


@pytest.fixture(scope="module")
def server(default_model_dir: Any) -> Iterator[LiveServer]:
    from transformers import AutoTokenizer

    engine = FakeEngine(AutoTokenizer.from_pretrained(str(default_model_dir)))
    live = LiveServer(create_app(GatewayConfig(api_keys=(KEY, OTHER)),
                                 engine_factory=lambda _: engine)).start()
    yield live
    live.stop()


def get(server: LiveServer, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(server.url + path, headers=headers, timeout=30)


def test_stats_and_trace_tokens(server: LiveServer) -> None:
    assert get(server, "/v1/stats", None).status_code == 401
    before = get(server, "/v1/stats", KEY).json()
    assert before["num_running"] == 0 and before["num_kv_blocks"] == 10
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "smollm2-135m-instruct", "max_tokens": 200,
                         "messages": [{"role": "user", "content": "Hi"}]})
    out = r.json()
    after = get(server, "/v1/stats", KEY).json()
    num_tokens = out["usage"]["completion_tokens"]
    assert after["streamed_tokens"] - before["streamed_tokens"] == num_tokens
    assert after["requests_finished"] - before["requests_finished"] == 1

    view = get(server, f"/v1/traces/{out['id']}/tokens", KEY).json()
    (choice,) = view["choices"]
    (tokens,) = view["token_views"]
    assert len(tokens["texts"]) == len(choice["completion_ids"]) == num_tokens
    assert "".join(tokens["texts"]).startswith(FAKE_TEXT) and tokens["closing_steps"] == []
    assert len(choice["token_times"]) == num_tokens and choice["weights_versions"] == []
    assert view["max_tokens"] == 200
    # the trace's access rules: another key sees nothing, not even that it exists
    assert get(server, f"/v1/traces/{out['id']}/tokens", OTHER).status_code == 404
    assert get(server, f"/v1/traces/{out['id']}/tokens", None).status_code == 401


def test_page_weight_and_no_ui() -> None:
    from starlette.testclient import TestClient

    from gateway.app import create_app
    from gateway.cli import _add_serve, config_from_args

    weight = sum(p.stat().st_size for p in STATIC_DIR.rglob("*") if p.is_file())
    assert 0 < weight < 200_000
    parser = argparse.ArgumentParser()
    _add_serve(parser.add_subparsers())
    assert config_from_args(parser.parse_args(["serve"])).ui
    for flags, status in ((["--no-ui"], 404), ([], 200)):
        config = config_from_args(parser.parse_args(["serve", "--api-key", KEY, *flags]))
        # no lifespan: nothing loads, the routes are what is tested
        client = TestClient(create_app(config))
        for path in ("/ui", "/ui/", "/ui/app.js"):
            assert client.get(path).status_code == status, path
