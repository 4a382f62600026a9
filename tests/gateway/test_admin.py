"""GET /v1/server_info and POST /v1/admin/weights on a live server with the tiny random llama."""
from __future__ import annotations

import dataclasses
import json
import re
import threading

import httpx
import pytest
import torch
from safetensors.torch import save_file

from engine import EngineConfig
from engine.loader import load_state_dict
from gateway.cli import _add_serve, config_from_args
from gateway.config import GatewayConfig
from tests.gateway.conftest import serve, sse_events, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}
USER = {"Authorization": "Bearer user-key"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    config = GatewayConfig(
        engine=EngineConfig(model=str(tiny_model_dir), max_num_seqs=4, kv_cache_memory_mb=16,
                            block_size=8, max_num_batched_tokens=96, max_model_len=256,
                            deterministic=True),
        api_keys=("user-key",), admin_key="admin-secret", served_model_name="tiny")
    yield from serve(config)


@pytest.fixture(scope="module")
def new_weights(tiny_model_dir, tmp_path_factory):
    """The tiny model's tensors, perturbed, as one safetensors file."""
    g = torch.Generator().manual_seed(7)
    state = {k: (v + 0.5 * torch.randn(v.shape, generator=g)).contiguous()
             for k, v in load_state_dict(tiny_model_dir).items()}
    path = tmp_path_factory.mktemp("new-weights") / "model.safetensors"
    save_file(state, str(path))
    return path


def greedy(server, prompt_ids=(1, 422, 1234, 77, 9)):
    r = httpx.post(server.url + "/v1/completions", headers=USER, timeout=60, json={
        "model": "tiny", "prompt": list(prompt_ids), "max_tokens": 8, "temperature": 0,
        "ignore_eos": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def post_weights(server, body, headers=ADMIN):
    return httpx.post(server.url + "/v1/admin/weights", headers=headers, json=body, timeout=120)


def info(server):
    r = httpx.get(server.url + "/v1/server_info", headers=USER)
    assert r.status_code == 200, r.text
    return r.json()


def test_server_info_reports_the_settings_in_force(server, tiny_model_dir):
    body = info(server)
    assert body["ready"] is True
    m = body["model"]
    assert m["id"] == "tiny" and m["source"] == str(tiny_model_dir)
    assert m["path"] == str(tiny_model_dir) and m["architecture"] == "llama"
    assert m["vocab_size"] == 49152 and isinstance(m["weights_version"], int)
    n = body["numerics"]
    assert n["dtype"] == "float32" and n["lm_head_dtype"] == "float32"
    assert n["dtype_asked"] == "float32" and n["dtype_reason"] == "asked for"
    assert n["lm_head_precision"] == "fp32" and n["lm_head_precision_asked"] == "auto"
    assert "deterministic" in n["lm_head_reason"]
    assert n["deterministic"] is True
    kernels = n["deterministic_kernels"]
    assert set(kernels) == {"linear", "lm_head", "rms_norm", "silu_mul", "attention", "sampler"}
    assert "panel_gemm" in kernels["linear"] and "no fastmath" in kernels["attention"]
    assert n["default_logprobs_mode"] == "processed"
    assert n["device"] == "cpu" and n["device_asked"] == "cpu" and n["cuda_graphs"] is None
    assert n["device_reason"] == "asked for"      # EngineConfig's default: the CPU
    s = body["scheduling"]
    assert (s["block_size"], s["max_num_seqs"], s["max_num_batched_tokens"]) == (8, 4, 96)
    assert s["max_model_len"] == 256 and s["enable_chunked_prefill"] is True
    assert s["num_kv_blocks"] > 0
    assert body["grammar"]["backend"] == "llguidance"
    assert body["engine_config"] == dataclasses.asdict(server.runtime.config.engine)
    v = body["versions"]
    assert v["torch"] == torch.__version__.split("+")[0] or v["torch"] == torch.__version__
    assert v["transformers"] and v["llguidance"] and v["python"]
    assert body["admin"] == {"weights_update": True}
    # behind the API key like the rest of /v1
    assert httpx.get(server.url + "/v1/server_info").status_code == 401


def test_admin_key_is_required_and_distinct_from_api_keys(server, new_weights):
    body = {"path": str(new_weights)}
    for headers in ({}, USER, {"Authorization": "Bearer wrong"}, {"X-Admin-Key": "wrong"}):
        r = post_weights(server, body, headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
    assert info(server)["model"]["weights_version"] == 0


def test_admin_is_disabled_without_an_admin_key(fake_server):
    server = fake_server()
    r = httpx.post(server.url + "/v1/admin/weights", json={"path": "/x"}, headers=ADMIN)
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "admin_disabled" and "--admin-key" in err["message"]
    assert httpx.get(server.url + "/v1/server_info").json()["admin"] == {"weights_update": False}


def test_bad_updates_are_400s_and_the_server_goes_on(server, tmp_path, tiny_model_dir):
    before = greedy(server)
    not_weights = tmp_path / "notes.txt"
    not_weights.write_text("hello")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    wrong_shape = tmp_path / "wrong.safetensors"
    state = load_state_dict(tiny_model_dir)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:, :32].contiguous()
    save_file(state, str(wrong_shape))
    missing = tmp_path / "missing.safetensors"
    save_file({"lm_head.weight": state["lm_head.weight"]}, str(missing))
    cases = [
        ({"path": str(tiny_model_dir), "mode": "sideways"}, "mode"),
        ({"mode": "pause"}, "path"),
        ({"path": ""}, "path"),
        ({"path": str(tiny_model_dir), "reset_cache": "yes"}, "reset_cache"),
        ({"path": str(tiny_model_dir), "extra": 1}, "extra"),
        ({"path": str(tmp_path / "absent")}, "path"),
        ({"path": str(not_weights)}, "path"),
        ({"path": str(garbage)}, "path"),
        ({"path": str(wrong_shape)}, "path"),
        ({"path": str(missing)}, "path"),
    ]
    for body, param in cases:
        r = post_weights(server, body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)
    r = httpx.post(server.url + "/v1/admin/weights", headers=ADMIN, content=b"{not json")
    assert r.status_code == 400
    assert info(server)["model"]["weights_version"] == 0
    assert greedy(server) == before


def test_update_changes_outputs_and_reports_the_version(server, new_weights, tiny_model_dir):
    before = greedy(server)
    r = post_weights(server, {"path": str(new_weights), "mode": "pause", "reset_cache": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["weights_version"] == 1 and out["mode"] == "pause" and out["reset_cache"] is True
    after = greedy(server)
    assert after != before
    m = info(server)["model"]
    assert m["weights_version"] == 1 and m["weights_source"] == str(new_weights)
    # an HF directory works too, in each mode; the original weights give the original output
    for version, mode in ((2, "drain"), (3, "abort")):
        r = post_weights(server, {"path": str(tiny_model_dir), "mode": mode})
        assert r.status_code == 200 and r.json()["weights_version"] == version, r.text
    assert greedy(server) == before
    assert info(server)["model"]["weights_source"] == str(tiny_model_dir)


def stream_during_update(server, body):
    """Stream 250 greedy tokens; once the first arrives, POST the update. Returns the events
    and the update's response."""
    events: list = []

    def consume():
        with httpx.stream("POST", server.url + "/v1/completions", headers=USER, timeout=60, json={
                "model": "tiny", "prompt": [1, 422, 1234], "max_tokens": 250, "temperature": 0,
                "ignore_eos": True, "logprobs": 0, "stream": True}) as r:
            for line in r.iter_lines():      # one at a time: sse_events waits for the end
                events.extend(sse_events(iter([line])))

    reader = threading.Thread(target=consume)
    reader.start()
    wait_for(lambda: any(isinstance(e, dict) and e.get("choices") for e in events),
             what="the first token")
    update = post_weights(server, body)
    reader.join(60)
    assert not reader.is_alive(), "the stream hung"
    assert events[-1] == "[DONE]"
    return events, update


def test_updates_while_a_stream_runs(server, new_weights, tiny_model_dir):
    def tokens(events):
        return [t for e in events if isinstance(e, dict) and e.get("choices")
                for t in (e["choices"][0]["logprobs"] or {}).get("tokens", [])]

    def versions(events):
        """Each token's weights version, from the chunks' `plumbline` objects."""
        out = []
        for e in events:
            if isinstance(e, dict) and e.get("choices") and e["choices"][0].get("plumbline"):
                ext, n = e["choices"][0]["plumbline"], len(e["choices"][0]["logprobs"]["tokens"])
                out += ext["weights_versions"][0] if "weights_versions" in ext else [
                    ext["weights_version"]] * n
        return out

    version = info(server)["model"]["weights_version"]
    # pause: the stream goes on, its later tokens on the new weights, each token saying which;
    # drain: the swap waits for the stream, whose tokens all come from the old weights
    for mode, path in (("pause", new_weights), ("drain", tiny_model_dir)):
        events, update = stream_during_update(server, {"path": str(path), "mode": mode})
        version += 1
        assert update.status_code == 200 and update.json()["weights_version"] == version
        assert len(tokens(events)) == len(versions(events)) == 250
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        seen = versions(events)
        if mode == "pause":
            assert seen == sorted(seen) and seen[0] == version - 1 and seen[-1] == version
        else:
            assert set(seen) == {version - 1}
    # abort: the running stream ends with an error event saying so, then [DONE]
    events, update = stream_during_update(server, {"path": str(new_weights), "mode": "abort"})
    assert update.status_code == 200 and update.json()["weights_version"] == version + 1
    assert len(tokens(events)) < 250
    assert events[-2]["error"]["code"] == "aborted"
    post_weights(server, {"path": str(tiny_model_dir)})      # back to the original weights


def test_cli_admin_key_from_flag_or_environment(monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    _add_serve(parser.add_subparsers())
    monkeypatch.delenv("PLUMBLINE_ADMIN_KEY", raising=False)
    assert config_from_args(parser.parse_args(["serve"])).admin_key == ""
    monkeypatch.setenv("PLUMBLINE_ADMIN_KEY", "from-env")
    assert config_from_args(parser.parse_args(["serve"])).admin_key == "from-env"
    args = parser.parse_args(["serve", "--admin-key", "from-flag"])
    assert config_from_args(args).admin_key == "from-flag"


def test_openapi_lists_the_new_endpoints(fake_server):
    server = fake_server()
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert "/v1/server_info" in paths and "/v1/admin/weights" in paths
    assert json.dumps(paths["/v1/admin/weights"]).count("WeightsUpdateRequest") == 1


def test_openapi_declares_path_parameters_and_the_tokenizer_routes(fake_server):
    server = fake_server()
    spec = httpx.get(server.url + "/openapi.json").json()
    paths = spec["paths"]
    for path, name in (("/v1/models/{model}", "model"), ("/v1/traces/{request_id}", "request_id")):
        (param,) = paths[path]["get"]["parameters"]
        assert param["name"] == name and param["in"] == "path" and param["required"] is True
        assert param["schema"] == {"type": "string"}
        assert "404" in paths[path]["get"]["responses"]
    # every {template} in a path is a declared parameter, and every declared one is in the path
    for path, item in paths.items():
        for op in item.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), path
    tokenize = paths["/tokenize"]["post"]
    refs = json.dumps(tokenize["requestBody"])
    assert "TokenizeCompletionRequest" in refs and "TokenizeChatRequest" in refs
    assert "TokenizeResponse" in json.dumps(tokenize["responses"]["200"])
    assert "DetokenizeRequest" in json.dumps(paths["/detokenize"]["post"]["requestBody"])
    schemas = spec["components"]["schemas"]
    for name in ("TokenizeResponse", "DetokenizeResponse", "TokenizeChatRequest"):
        assert name in schemas
    assert {"count", "max_model_len", "tokens"} <= set(schemas["TokenizeResponse"]["properties"])
