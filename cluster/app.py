"""The Serve application and `plumbline serve --replicas N`.

`build_app(config, num_replicas)` is also what a Serve config file names
(`import_path: cluster.app:app_from_args`, see docs/SCALING.md), so `serve run` and
`serve deploy` (KubeRay's RayService) deploy the same application as the CLI.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import structlog

from gateway.config import GatewayConfig

log = structlog.get_logger("plumbline.cluster")

APP_NAME = "plumbline"
ROOT = Path(__file__).resolve().parents[1]


def build_app(config: GatewayConfig, num_replicas: int, replica_cpus: float = 1.0,
              ingress: bool = True) -> Any:
    """The application: `num_replicas` engine replicas, behind an ingress deployment for Ray's
    HTTP proxy (`ingress`), or alone for an ingress in the calling process (`driver_ingress`)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from cluster.ingress import Ingress
    from cluster.replica import EngineReplica

    # Ray's own cap sits above the gateway's: the replica's admission queue answers 429 (and the
    # ingress retries elsewhere) before Ray would hold requests back.
    max_ongoing = config.engine.max_num_seqs + config.max_queued_requests + 1
    threads = str(replica_threads(config, replica_cpus))
    engine = serve.deployment(EngineReplica, name="engine").options(
        num_replicas=num_replicas, max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_cpus": replica_cpus, "runtime_env": {"env_vars": {
            "NUMBA_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}}},
        request_router_config=RequestRouterConfig(
            request_router_class="cluster.router.PlumblineRouter"),
        health_check_period_s=5, graceful_shutdown_timeout_s=config.drain_timeout_s)
    if not ingress:
        return engine.bind(config)
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress").options(
        num_replicas=1, max_ongoing_requests=max(1000, num_replicas * max_ongoing),
        ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine.bind(config), config)


def replica_threads(config: GatewayConfig, replica_cpus: float) -> int:
    """The threads one engine replica may run: `--num-threads`, else its CPUs (at least one).

    Goes into each replica's environment as NUMBA_NUM_THREADS (and OMP_NUM_THREADS), read
    before numba starts its OpenMP pool, so the pool of each replica is its own size rather
    than one thread per core of the node. (Starting the pool used to reset the compute thread's
    OpenMP count to the node's cores, which made two replicas on 2 cores run 4 spinning
    threads; kernels.backend.start_numba now puts the count back in any process.)"""
    return config.engine.num_threads or max(1, int(replica_cpus))


def app_from_args(args: dict[str, str]) -> Any:
    """For Serve config files: `args` are `plumbline serve` options without dashes, e.g.
    {"model": "...", "replicas": "2", "session_store": "redis://..."}."""
    import argparse

    from gateway import cli

    parser = argparse.ArgumentParser(prog="plumbline")
    cli._add_serve(parser.add_subparsers(dest="command"))
    argv = ["serve"]
    for key, value in args.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    ns = parser.parse_args(argv)
    return build_app(cli.config_from_args(ns), ns.replicas or 1)


def driver_ingress(config: GatewayConfig) -> Any:
    """The ASGI app that serves HTTP in this process: the ingress, calling the engine replicas
    of the deployed application through a DeploymentHandle (so our router runs here).

    One Ray hop per request instead of two (proxy -> ingress replica -> engine replica);
    `benchmarks/router_overhead.py` measures both (docs/BENCHMARKS.md)."""
    from ray import serve

    from cluster.ingress import Ingress

    handle = serve.get_deployment_handle("engine", app_name=APP_NAME)
    return Ingress(handle, config, behind_ray_proxy=False).__serve_build_asgi_app__()


def serve_cluster(config: GatewayConfig, num_replicas: int, ray_address: str | None,
                  ray_http_proxy: bool = False) -> int:
    """Join the Ray cluster at `ray_address` (or start a local one), deploy the replicas, serve
    HTTP here (uvicorn) or through Ray's HTTP proxy on every node (`ray_http_proxy`) until a
    signal, then delete the application (each replica drains: graceful_shutdown_timeout_s)."""
    import ray
    from ray import serve

    # Ray runs its workers, the engine replicas among them, at nice 15 below its own processes
    # (GCS, raylet, dashboard) and this one (the ingress): on a machine the replicas keep busy
    # they then lose the CPU to all of those. A Ray started here runs them at the same priority;
    # a cluster started with `ray start` keeps its own setting (docs/SCALING.md).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address=ray_address or None, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}})
    url = f"http://{config.host}:{config.port}"
    try:
        if ray_http_proxy:
            serve.start(http_options={"host": config.host, "port": config.port})
            serve.run(build_app(config, num_replicas), name=APP_NAME, route_prefix="/")
            log.info("server_listening", url=url, model=config.model_name, http="ray proxy",
                     replicas=num_replicas, ray=ray.get_runtime_context().gcs_address)
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
        else:
            import uvicorn

            serve.start(http_options={"location": "NoServer"})
            serve.run(build_app(config, num_replicas, ingress=False), name=APP_NAME,
                      route_prefix=None)
            log.info("server_listening", url=url, model=config.model_name, http="this process",
                     replicas=num_replicas, ray=ray.get_runtime_context().gcs_address)
            # uvicorn stops on SIGTERM/SIGINT after the requests in flight (the replicas' own
            # drain bounds them), restores the handlers it found and raises the signal again:
            # these handlers let that pass, so the replicas and the local Ray go (`finally`,
            # atexit) instead of the default SIGTERM action killing this process first.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: None)
            uvicorn.run(driver_ingress(config), host=config.host, port=config.port,
                        access_log=False, log_level=config.log_level,
                        timeout_graceful_shutdown=int(config.drain_timeout_s) + 5)
    finally:
        serve.delete(APP_NAME)
    return 0


def _pythonpath() -> str:
    # Replicas import this checkout's packages, before any installed copy.
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
