"""`plumbline serve --replicas 2`, for real: one local Ray (2 CPUs, no dashboard) for the whole
module, two engine replicas of the tiny test model, and a real Redis for session facts and
traces. HTTP comes in as with the CLI's default, through the ingress served by uvicorn in this
process (`cluster.app.driver_ingress`); Ray Serve's HTTP proxy also runs, in front of the
ingress deployment of a `serve run` config file, and the streaming test goes through both.
Tests run in file order; the kill comes last but one, the recovery last."""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests.cluster.conftest import RedisServer, free_port

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (the cluster extra)")
pytest.importorskip("redis", reason="redis-py is not installed (the cluster extra)")

ROOT = Path(__file__).resolve().parents[2]
KEY, ADMIN = "cluster-key", "cluster-admin"
AUTH = {"Authorization": f"Bearer {KEY}"}
PLAN_SCHEMA = {"type": "object", "properties": {"plan": {"const": "free"}},
               "required": ["plan"], "additionalProperties": False}
SLOTS = 8
DETECT = {"mode": "flag", "checks": {"consistency": "detect"}}


class Cluster:
    def __init__(self, url: str, model: str, proxy_url: str) -> None:
        self.url, self.model, self.proxy_url = url, model, proxy_url
        self.http = httpx.Client(base_url=url, headers=AUTH, timeout=120)

    def chat(self, text: str, **extra: Any) -> httpx.Response:
        body = {"model": self.model, "messages": [{"role": "user", "content": text}],
                "max_tokens": 4, "temperature": 0.0, **extra}
        return self.http.post("/v1/chat/completions", json=body)


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer, tiny_model_dir: Path) -> Iterator[Cluster]:
    from ray import serve

    from cluster.app import build_app, driver_ingress
    from engine import EngineConfig
    from gateway.config import GatewayConfig

    config = GatewayConfig(
        engine=EngineConfig(model=str(tiny_model_dir), max_num_seqs=SLOTS, kv_cache_memory_mb=32,
                            num_threads=1),
        api_keys=(KEY,), admin_key=ADMIN, session_store=redis_server.url,
        max_queued_requests=0)       # a replica with every slot taken answers 429
    port, proxy_port = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}})
    server: uvicorn.Server | None = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
        serve.run(build_app(config, num_replicas=2), name="plumbline", route_prefix="/")
        server = uvicorn.Server(uvicorn.Config(driver_ingress(config), host="127.0.0.1",
                                               port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:      # a deadline against hangs, not a timing assertion
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield Cluster(f"http://127.0.0.1:{port}", str(tiny_model_dir),
                      f"http://127.0.0.1:{proxy_port}")
    finally:
        if server is not None:
            server.should_exit = True
        serve.shutdown()
        ray.shutdown()


def replica_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["x-plumbline-replica"]


def test_requests_land_on_both_replicas(cluster: Cluster) -> None:
    seen = {replica_of(cluster.chat(f"Question number {i}: {'why ' * i}?")) for i in range(12)}
    assert len(seen) == 2


@pytest.mark.parametrize("entry", ["this process", "ray proxy"])
def test_streaming_errors_and_auth_behave_as_one_process(cluster: Cluster, entry: str) -> None:
    url = cluster.url if entry == "this process" else cluster.proxy_url
    http = httpx.Client(base_url=url, headers=AUTH, timeout=120)
    body = {"model": cluster.model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body,
                     headers={"X-Request-Id": "my-request-7"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers.get_list("x-request-id") == ["my-request-7"]
        assert r.headers["x-plumbline-replica"]
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 5
    bad = http.post("/v1/chat/completions", json={**body, "stream": False, "temperature": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    anonymous = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    assert http.get("/v1/models").json()["data"][0]["id"] == cluster.model


def test_a_session_sticks_to_one_replica(cluster: Cluster) -> None:
    session = {"plumbline": {"session_id": "sticky-1"}}
    assert len({replica_of(cluster.chat(f"turn {i}", **session)) for i in range(5)}) == 1


def test_a_prefix_sharing_burst_lands_on_the_replica_with_the_cache(cluster: Cluster) -> None:
    system = "You are a careful assistant for the plumbline test suite. " * 8   # > 256 chars
    def ask(i: int) -> httpx.Response:
        return cluster.chat("", messages=[{"role": "system", "content": system},
                                          {"role": "user", "content": f"Item {i}?"}])
    first = replica_of(ask(0))
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        burst = list(pool.map(ask, range(1, 7)))
    assert {replica_of(r) for r in burst} == {first}
    # the prefix cache hit: each later prompt reused the first one's KV blocks
    assert all(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16 for r in burst)


def test_a_replica_s_429_is_retried_on_the_other(cluster: Cluster) -> None:
    session = {"plumbline": {"session_id": "crowded"}}     # all prefer the same replica

    def ask(i: int) -> httpx.Response:
        return cluster.chat(f"Long story {i}", max_tokens=200, ignore_eos=True, **session)

    with concurrent.futures.ThreadPoolExecutor(SLOTS + 4) as pool:
        replies = list(pool.map(ask, range(SLOTS + 4)))
    served_by = [replica_of(r) for r in replies]           # every one a 200
    assert len(set(served_by)) == 2
    assert max(served_by.count(r) for r in set(served_by)) <= SLOTS


def engine_handle() -> Any:
    from ray import serve

    return serve.get_deployment_handle("engine", app_name="plumbline").options(stream=True)


def direct(replica: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A request sent to one named replica through Ray Serve's handle (pinned by the router)."""
    from cluster.routing import RoutingHints

    async def run() -> tuple[int, dict[str, Any]]:
        from cluster.ingress import _collect

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
                 "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"),
                             (b"authorization", f"Bearer {KEY}".encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        status, headers, payload = await _collect(engine_handle().forward.remote(
            RoutingHints(pin=replica), scope, json.dumps(body).encode()))
        assert headers[b"x-plumbline-replica"].decode() == replica
        return status, json.loads(payload)

    import asyncio

    return asyncio.run(run())


def test_a_fact_written_through_one_replica_is_enforced_by_the_other(cluster: Cluster) -> None:
    session = {"session_id": "shared-facts", "guard": DETECT}
    written = cluster.chat("Which plan?", plumbline={**session, "assertions": {"/plan": "pro"}})
    a = replica_of(written)
    others = {replica_of(cluster.chat(f"Question number {i}: {'why ' * i}?")) for i in range(12)}
    (b,) = others - {a}
    status, out = direct(b, {"model": cluster.model, "max_tokens": 20,
                             "messages": [{"role": "user", "content": "Which plan now?"}],
                             "response_format": {"type": "json_schema", "json_schema": {
                                 "name": "p", "schema": PLAN_SCHEMA}},
                             "plumbline": session})
    assert status == 200 and json.loads(out["choices"][0]["message"]["content"]) == {"plan": "free"}
    (violation,) = out["plumbline"]["checks"]["violations"]
    assert "/plan" in violation["message"] and "plumbline.assertions" in violation["message"]


def test_a_trace_is_read_through_any_replica(cluster: Cluster) -> None:
    out = cluster.chat("Trace me.").json()
    reads = [cluster.http.get(f"/v1/traces/{out['id']}") for _ in range(6)]
    assert {r.status_code for r in reads} == {200}
    assert {r.json()["id"] for r in reads} == {out["id"]}


def test_the_weights_update_fans_out_to_every_replica(cluster: Cluster, tiny_model_dir: Path) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(cluster.url + "/v1/admin/weights", headers=admin, timeout=120,
                   json={"path": str(tiny_model_dir / "model.safetensors"), "mode": "pause"})
    assert r.status_code == 200, r.text
    versions = r.json()["weights_versions"]
    assert len(versions) == 2 and set(versions.values()) == {1}
    refused = httpx.post(cluster.url + "/v1/admin/weights", headers=AUTH, timeout=60,
                         json={"path": str(tiny_model_dir / "model.safetensors")})
    assert refused.status_code in (401, 403)
    metrics = httpx.get(cluster.url + "/metrics", timeout=60).text
    labelled = {line.split('replica="')[1].split('"')[0] for line in metrics.splitlines()
                if line.startswith("plumbline:") and 'replica="' in line}
    assert labelled == set(versions)


def loadtest_args(cluster: Cluster, out: Path, run_time: str) -> Any:
    from loadtests import run as loadtest

    return loadtest.build_parser().parse_args([
        "--host", cluster.url, "--api-key", KEY, "--users", "4", "--spawn-rate", "4",
        "--run-time", run_time, "--scenarios", "chat", "plain", "--max-tokens", "24",
        "--out", str(out), "--no-plots", "--settle-timeout", "60", "--stop-timeout", "60s"])


def test_the_load_test_runs_against_the_replicas_and_reports_each_one(cluster: Cluster,
                                                                       tmp_path: Path) -> None:
    from loadtests import run as loadtest

    report = loadtest.execute(loadtest_args(cluster, tmp_path, "10s"))
    assert report.problems == [], report.problems
    (level,) = report.levels
    assert level.requests > 0 and level.failures == 0
    assert len(level.replicas) == 2          # both served (requests land on both)
    for figures in level.replicas.values():
        assert figures["requests"] > 0 and figures["failures"] == 0 and figures["tokens"] > 0
    assert sum(f["tokens"] for f in level.replicas.values()) == level.tokens
    summary = (tmp_path / "summary.md").read_text()
    assert "## Per replica" in summary and all(r in summary for r in level.replicas)


def test_killing_a_replica_mid_load_loses_no_session_fact(cluster: Cluster, tmp_path: Path) -> None:
    from loadtests import run as loadtest

    sessions = [f"kill-{i}" for i in range(6)]
    homes = {}
    for s in sessions:       # each session's fact, written wherever the session lives
        homes[s] = replica_of(cluster.chat("Plan?", plumbline={
            "session_id": s, "guard": DETECT, "assertions": {"/plan": "pro"}}))
    victim = homes[sessions[0]]

    def stream(i: int) -> tuple[int, list[Any]]:
        body = {"model": cluster.model, "messages": [{"role": "user", "content": f"Go {i}"}],
                "max_tokens": 200, "stream": True, "plumbline": {"session_id": sessions[i % 6]}}
        with cluster.http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return r.status_code, [json.loads(r.read())]
            return 200, [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
                         for line in r.iter_lines() if line.startswith("data: ")]

    # The load test's 4 users run throughout, and 4 streams of our own (the victim's session
    # among them); the kill comes in the load test's 6th second or so. At most 8 requests at a
    # time: the survivor's slots, so none is refused for capacity after the kill.
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        load_test = pool.submit(loadtest.execute, loadtest_args(cluster, tmp_path, "20s"))
        time.sleep(5.0)      # (no assertion depends on these timings)
        load = [pool.submit(stream, i) for i in range(4)]
        time.sleep(1.0)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::plumbline#engine#{victim}", namespace="serve"))
        results = [f.result() for f in load]
        report = load_test.result()
    for status, events in results:   # finished, or failed the way an in-flight stream does
        errors = [e["error"]["code"] for e in events if isinstance(e, dict) and "error" in e]
        assert set(errors) <= {"replica_failed"}, events[-2:]
        assert (status, events[-1]) == (200, "[DONE]") or (status, errors) == (503, ["replica_failed"])
        assert errors or events[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    # The load test failed only what was in flight on the victim: at most one request per user,
    # each ended by the replica's failure; the server came back clean (nothing running, no block
    # held) and its report shows the victim's requests until the kill.
    (level,) = report.levels
    assert level.failures <= 4 and level.requests > 3 * level.failures, level.failure_lines
    assert all("replica_failed" in line for line in level.failure_lines), level.failure_lines
    assert [p for p in report.problems if "failed requests" not in p] == []
    assert level.replicas[victim]["requests"] > 0
    assert "tokens" not in level.replicas[victim]     # its counter went with it
    for s in sessions:       # every fact survived, whichever replica answers now
        out = cluster.chat("Plan now?", plumbline={"session_id": s, "guard": DETECT},
                           response_format={"type": "json_schema", "json_schema": {
                               "name": "p", "schema": PLAN_SCHEMA}}, max_tokens=20)
        assert out.status_code == 200, out.text
        (violation,) = out.json()["plumbline"]["checks"]["violations"]
        assert "/plan" in violation["message"]
