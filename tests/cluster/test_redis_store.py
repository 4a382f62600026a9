"""Shared state on a real Redis, no Ray: the store alone, then two gateways (two processes'
worth of state: separate apps, rings and secrets) on one Redis, each with a scripted engine.
A session fact written through A is enforced by B; a trace made on A is read on B with the
same access rules; Redis down: requests without a session are served, those with one get a
503 naming the store, and the facts are there again once Redis is back."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.guard.facts import Assertion
from gateway.guard.redis_store import open_shared_state, store_name
from gateway.guard.sessions import StoreUnavailable
from tests.cluster.conftest import RedisServer, free_port
from tests.gateway.conftest import LiveServer
from tests.gateway.test_guard_server import ScriptedEngine

pytest.importorskip("redis", reason="redis-py is not installed (the cluster extra)")

MODEL = "smollm2-135m-instruct"
KEY_A, KEY_B, ADMIN = "key-of-alice", "key-of-bob", "admin-key"
ASK = [{"role": "user", "content": "Go."}]
DETECT = {"checks": {"consistency": "detect"}}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _roundtrip(url: str) -> tuple[list[Assertion], list[Assertion], int, Any]:
    shared = open_shared_state(url, ttl_s=60)
    try:
        await shared.sessions.save("s", [Assertion("/order/id", 41, "response 1"),
                                         Assertion("/ok", True, "response 1")])
        await shared.sessions.save("s", [Assertion("/order/id", 42.5, "response 2"),
                                         Assertion("/note", None, "response 2")])
        facts = await shared.sessions.load("s")
        other = await shared.sessions.load("nobody")
        ttl_ms = await shared.client.pttl("plumbline:session:s")
        await shared.traces.put({"request_id": "chatcmpl-1", "http_request_id": "req-1",
                                 "x": [1, 2]})
        by_alias = await shared.traces.get("req-1")
        return facts, other, ttl_ms, by_alias
    finally:
        await shared.aclose()


def test_session_facts_round_trip_merge_and_expire_in_redis(redis_server: RedisServer) -> None:
    facts, other, ttl_ms, by_alias = run(_roundtrip(redis_server.url))
    assert sorted((a.key, a.value, a.source) for a in facts) == [
        ("/note", None, "response 2"), ("/ok", True, "response 1"),
        ("/order/id", 42.5, "response 2")]           # a later save replaces a key, keeps others
    assert other == []
    assert 0 < ttl_ms <= 60_000                      # the session's lifetime is a Redis expiry
    assert by_alias == {"request_id": "chatcmpl-1", "http_request_id": "req-1", "x": [1, 2]}


def test_every_client_of_one_store_gets_the_same_trace_secret(redis_server: RedisServer) -> None:
    first, second = (open_shared_state(redis_server.url, 60) for _ in range(2))
    assert first.trace_secret is not None and len(first.trace_secret) == 32
    assert first.trace_secret == second.trace_secret


def test_a_store_that_does_not_answer_is_a_503_naming_it() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"     # nothing listens there
    shared = open_shared_state(url, 60, timeout_s=0.5)
    assert shared.trace_secret is None                     # start-up goes on without it
    with pytest.raises(StoreUnavailable) as caught:
        run(shared.sessions.load("s"))
    assert caught.value.status == 503 and caught.value.code == "session_store_unavailable"
    assert store_name(url) in caught.value.message and "hunter2" not in caught.value.message


@pytest.fixture(scope="module")
def tokenizer_m(default_model_dir: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.fixture(scope="module")
def pair(redis_server: RedisServer, tokenizer_m: Any) -> Iterator[list[LiveServer]]:
    """Two gateways on one Redis, as two replicas would be."""
    servers = []
    for _ in range(2):
        engine = ScriptedEngine(tokenizer_m)
        config = GatewayConfig(api_keys=(KEY_A, KEY_B), admin_key=ADMIN, guard_mode="flag",
                               session_store=redis_server.url)
        live = LiveServer(create_app(config, engine_factory=lambda _, e=engine: e)).start()
        live.engine = engine  # type: ignore[attr-defined]
        servers.append(live)
    yield servers
    for live in servers:
        live.stop()


def chat(server: LiveServer, text: str, key: str = KEY_A, **plumbline: Any) -> Any:
    server.engine.script(text)  # type: ignore[attr-defined]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100,
                                          extra_body={"plumbline": {"guard": DETECT,
                                                                    **plumbline}})


def checks(out: Any) -> dict[str, Any]:
    return dict(out.model_extra["plumbline"]["checks"])


def test_a_fact_written_through_one_gateway_is_enforced_by_the_other(pair: list[LiveServer]) -> None:
    a, b = pair
    first = chat(a, '{"order": {"id": 41}}', session_id="shared-1")
    assert checks(first)["passed"]
    later = chat(b, '{"order": {"id": 42}}', session_id="shared-1")   # no history sent
    (v,) = checks(later)["violations"]
    assert "/order/id" in v["message"] and first.id in v["message"]
    assert checks(chat(b, '{"order": {"id": 42}}', session_id="shared-2"))["passed"]


def trace(server: LiveServer, trace_id: str, key: str) -> httpx.Response:
    return httpx.get(f"{server.url}/v1/traces/{trace_id}",
                     headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_a_trace_made_on_one_gateway_is_read_on_the_other_by_the_same_rules(
        pair: list[LiveServer]) -> None:
    a, b = pair
    out = chat(a, "Nothing to see here.")
    assert b.runtime.traces.get(out.id) is None            # not in B's own ring
    mine = trace(b, out.id, KEY_A)
    assert mine.status_code == 200 and mine.json()["id"] == out.id
    assert mine.json()["choices"][0]["completion_ids"] == a.runtime.traces.get(out.id).to_dict()[
        "choices"][0]["completion_ids"]
    assert trace(b, out.id, ADMIN).status_code == 200
    other = trace(b, out.id, KEY_B)                        # another key: as unknown as a typo
    assert other.status_code == 404 and other.json()["error"]["code"] == "trace_not_found"


def test_redis_down_serves_requests_without_a_session_and_503s_those_with_one(
        pair: list[LiveServer], redis_server: RedisServer) -> None:
    a, b = pair
    chat(a, '{"plan": "pro"}', session_id="outage-1")
    redis_server.stop()
    try:
        assert chat(b, "Still here.").choices[0].message.content == "Still here."
        with pytest.raises(openai.APIStatusError) as caught:
            chat(b, '{"plan": "free"}', session_id="outage-1")
        err = caught.value.response.json()["error"]
        assert caught.value.status_code == 503 and err["code"] == "session_store_unavailable"
        assert redis_server.url in err["message"]
    finally:
        redis_server.start()       # same port: a Redis without the data (no persistence)
    chat(a, '{"plan": "pro"}', session_id="outage-2")
    (v,) = checks(chat(b, '{"plan": "free"}', session_id="outage-2"))["violations"]
    assert "/plan" in v["message"]


def test_a_trace_record_round_trips_through_json_whole() -> None:
    import json

    from gateway.guard.traces import Trace
    from grammars.spec import GrammarSpec

    t = Trace("chatcmpl-9", "req-9", "chat.completion", [1, 2, 3], "processed",
              spec=GrammarSpec("regex", "a+"), owner="owner-hmac",
              guard={"mode": "block", "release": "unit", "checks": {}, "pinned": False})
    t.add_tokens(0, [7, 8], [-0.5, -0.25])
    t.event("violation", 0, {"check": "deny"})
    t.finish_choice(0, "content_filter", {"passed": False, "blocked": True})
    t.finished_at = 1234.5
    assert Trace.from_record(json.loads(json.dumps(t.to_record()))) == t
