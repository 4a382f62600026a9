"""`plumbline verify` against our own live server (tiny random llama): it passes, and it fails
against a wrong reference, a wrong determinism promise or an unreachable server."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from engine import EngineConfig
from engine.loader import load_state_dict
from engine.sampler import truncate
from gateway.cli import main
from gateway.config import GatewayConfig
from clients.verify import nucleus
from tests.gateway.conftest import serve

FAST = ["--num-rollouts", "2", "--max-tokens", "8", "--schema-max-tokens", "24", "--json"]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    config = GatewayConfig(
        engine=EngineConfig(model=str(tiny_model_dir), max_num_seqs=32, kv_cache_memory_mb=16,
                            deterministic=True),
        api_keys=("k",))
    yield from serve(config)


@pytest.fixture(scope="module")
def perturbed_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's config and tokenizer with slightly different weights: a wrong reference."""
    out = tmp_path_factory.mktemp("perturbed")
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    g = torch.Generator().manual_seed(3)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous()
             for k, v in load_state_dict(tiny_model_dir).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def run_verify(capsys, *argv):
    code = main(["verify", *argv])
    out = capsys.readouterr().out
    if "--json" not in argv:
        return code, out
    # the live server's log lines share stdout with the report
    return code, json.JSONDecoder().raw_decode(out[out.index('{\n  "url"'):])[0]


def test_verify_passes_against_our_server(server, capsys):
    code, report = run_verify(capsys, "--url", server.url, "--api-key", "k", *FAST)
    assert code == 0, report
    assert report["ok"] and report["server"]["deterministic"] is True
    assert report["token_ids_from"] == "return_token_ids"
    for mode in ("processed", "raw"):
        d = report["logprobs"][mode]
        assert d["num_tokens"] >= 8 and d["max_abs_diff"] < 1e-4 and d["clip_share"] == 0
    det = report["determinism"]
    assert det["expected"] and det["bit_identical"] == det["num_probes"] == 2
    assert det["concurrency"] == 32
    s = report["schemas"]
    assert s["invalid"] == 0 and s["error"] == 0 and s["valid"] + s["cut"] == 3
    names = {c["name"] for c in report["checks"]}
    assert {"logprobs_processed", "logprobs_raw", "determinism", "schema_compliance",
            "seed_independent_of_logprobs_mode"} <= names


def test_verify_recovers_token_ids_from_chat_bytes(server, capsys):
    """The fallback for servers without return_token_ids: ids from the chat logprobs' bytes."""
    code, report = run_verify(capsys, "--url", server.url, "--api-key", "k", "--from-bytes",
                              "--concurrency", "1", "--num-schemas", "0", *FAST)
    assert code == 0, report
    assert report["token_ids_from"] == "chat logprob bytes"
    assert report["logprobs"]["processed"]["max_abs_diff"] < 1e-4


def test_verify_fails_against_a_wrong_reference(server, perturbed_dir, capsys):
    code, out = run_verify(capsys, "--url", server.url, "--api-key", "k", "--model",
                           str(perturbed_dir), "--num-rollouts", "1", "--max-tokens", "8",
                           "--concurrency", "1", "--num-schemas", "0")
    assert code == 1
    assert "FAIL  logprobs_processed" in out and "FAIL  logprobs_raw" in out
    assert out.rstrip().splitlines()[-1].startswith("FAILED")


def test_verify_exits_2_when_it_cannot_run(capsys):
    assert main(["verify", "--url", "http://127.0.0.1:9", "--timeout", "2"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert main(["verify", "--url", "http://x", "--temperature", "0"]) == 2


def test_nucleus_agrees_with_the_engine_sampler():
    """verify's top-p is written from the definition; the engine's must agree with it."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g) * 3
    for top_p in (0.05, 0.5, 0.9, 0.999):
        mine = nucleus(logits, top_p)
        theirs = torch.stack([truncate(row, 0, top_p, 0.0) for row in logits])
        assert torch.equal(torch.isinf(mine), torch.isinf(theirs))
