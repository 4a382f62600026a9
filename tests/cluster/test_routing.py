"""The routing policy and the metrics merge, without a Ray cluster."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray", reason="ray[serve] is not installed (the cluster extra)")

from cluster.metrics import merge_metrics  # noqa: E402
from cluster.routing import PREFIX_CHARS, hints_for, rendezvous  # noqa: E402


def test_hints_prefer_the_session_then_the_prompt_prefix() -> None:
    system = {"role": "system", "content": "x" * PREFIX_CHARS}
    a = hints_for({"messages": [system, {"role": "user", "content": "one"}]})
    b = hints_for({"messages": [system, {"role": "user", "content": "two"}]})
    c = hints_for({"messages": [{"role": "system", "content": "y" * PREFIX_CHARS}]})
    assert a.prefix_key == b.prefix_key != c.prefix_key and a.session_id is None
    s = hints_for({"messages": [system], "plumbline": {"session_id": "s1"}})
    assert (s.session_id, s.prefix_key, s.affinity) == ("s1", None, "session:s1")
    long = "abc" * PREFIX_CHARS
    assert hints_for({"prompt": long}).prefix_key == hints_for({"prompt": [long]}).prefix_key
    assert hints_for({"prompt": list(range(PREFIX_CHARS))}).prefix_key is not None
    assert hints_for([1, 2]).affinity is None and hints_for({"prompt": ""}).affinity is None
    # short prompts go by queue length: they share too little to be worth a hashed replica
    for short in ({"prompt": "abc"}, {"prompt": [1, 2, 3]},
                  {"messages": [{"role": "user", "content": "Story 1:"}]}):
        assert hints_for(short).affinity is None


def replica(uid: str) -> Any:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=uid))


def test_rendezvous_moves_only_the_keys_of_a_replica_that_left() -> None:
    three = [replica(u) for u in ("a", "b", "c")]
    keys = [f"session:{i}" for i in range(300)]
    before = {k: rendezvous(k, three)[0].replica_id.unique_id for k in keys}
    after = {k: rendezvous(k, three[:2])[0].replica_id.unique_id for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "c"}
    assert set(before.values()) == {"a", "b", "c"}          # every replica gets some keys


def test_metrics_merge_by_family_with_a_replica_label() -> None:
    one = ('# HELP plumbline:tokens Tokens\n# TYPE plumbline:tokens counter\n'
           'plumbline:tokens_total{model_name="m"} 3.0\n')
    two = one.replace("3.0", "5.0")
    merged = merge_metrics({"r1": one, "r2": two})
    assert merged.count("# TYPE plumbline:tokens counter") == 1
    assert 'plumbline:tokens_total{model_name="m",replica="r1"} 3.0' in merged
    assert 'plumbline:tokens_total{model_name="m",replica="r2"} 5.0' in merged


def test_a_serve_config_file_builds_the_same_application(tiny_model_dir: Any) -> None:
    from cluster.app import app_from_args

    app = app_from_args({"model": str(tiny_model_dir), "replicas": "3",
                         "session_store": "redis://127.0.0.1:6379/0", "api_key": "k"})
    engine_config = app._bound_deployment.init_args[0]._bound_deployment
    assert engine_config.num_replicas == 3
    config = app._bound_deployment.init_args[1]
    assert config.session_store == "redis://127.0.0.1:6379/0" and config.api_keys == ("k",)


def test_each_replica_s_numba_and_openmp_pools_get_its_threads_only(tiny_model_dir: Any) -> None:
    # numba's pool would otherwise start one thread per core and reset torch's count with it.
    from cluster.app import app_from_args

    for args, threads in (({"num_threads": "3"}, "3"), ({}, "1")):
        app = app_from_args({"model": str(tiny_model_dir), "replicas": "2", **args})
        engine = app._bound_deployment.init_args[0]._bound_deployment
        env = engine.ray_actor_options["runtime_env"]["env_vars"]
        assert env == {"NUMBA_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
