"""`plumbline` command line: `plumbline serve|loadtest|verify [options]` (subcommands join
`_COMMANDS`)."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from engine.config import DEFAULT_MODEL, EngineConfig
from gateway import logs
from gateway.config import GatewayConfig

log = structlog.get_logger("plumbline.gateway")


def _add_serve(sub: Any) -> None:
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--model", default=DEFAULT_MODEL,
                   help="model id, HF-format directory or .gguf file")
    s.add_argument("--served-model-name", default="", help="the id clients send (default: --model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", action="append", default=[],
                   help="require 'Authorization: Bearer KEY' on /v1 (repeatable)")
    s.add_argument("--api-key-file", type=Path, help="a file with one API key per line")
    s.add_argument("--admin-key", default=argparse.SUPPRESS,     # no "(default: None)" in --help
                   help="enables POST /v1/admin/weights for 'Authorization: Bearer KEY' "
                        "(default: $PLUMBLINE_ADMIN_KEY; unset: admin endpoints disabled)")
    s.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests that may wait for a slot; more get 429")
    s.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    s.add_argument("--keepalive-interval", type=float, default=10.0,
                   help="seconds between SSE keep-alive pings while a stream is quiet")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    s.add_argument("--strict-fields", action="store_true",
                   help="refuse request fields outside OpenAI's and vLLM's APIs with a 400 "
                        "(default: ignore them with a warning and an x-plumbline-ignored header)")
    s.add_argument("--no-ui", dest="ui", action="store_false", help="no web console at /ui")
    s.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    r = s.add_argument_group("replicas (Ray Serve; docs/SCALING.md)")
    r.add_argument("--replicas", type=int, default=0,
                   help="run N engine replicas as a Ray Serve application (0: this process)")
    r.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (default: a running local one, else start one)")
    r.add_argument("--ray-http-proxy", action="store_true",
                   help="serve HTTP through Ray Serve's proxy on every node (an ingress "
                        "deployment), one hop more than the default: HTTP in this process")
    _add_guard_options(s.add_argument_group(
        "guard (a floor that requests may tighten in plumbline.guard)"))
    _add_engine_options(s.add_argument_group("engine (EngineConfig fields)"))
    s.set_defaults(func=serve)


def _add_guard_options(g: Any) -> None:
    g.add_argument("--guard-mode", choices=["off", "flag", "block"], default="off",
                   help="off: no checks; flag: stream as generated, report violations; "
                        "block: release text only once it passes")
    g.add_argument("--guard-release", choices=["stream", "unit", "final"], default="unit",
                   help="how much text block mode holds back")
    g.add_argument("--checks-config", type=Path,
                   help="a JSON or TOML file: check name -> setting, e.g. "
                        "{\"deny\": [\"(?i)drop\\\\s+table\"], \"arithmetic\": true}")
    g.add_argument("--session-ttl", type=float, default=3600.0,
                   help="seconds the facts of a plumbline.session_id are kept")
    g.add_argument("--session-store", default="",
                   help="redis://host:port/db: keep session facts and traces in Redis, shared "
                        "by every replica (default: in this process's memory)")
    g.add_argument("--max-traces", type=int, default=1000,
                   help="diagnostic traces kept in memory (GET /v1/traces/{id})")
    g.add_argument("--trace-dir", default=None, help="also append every trace to DIR/traces.jsonl")
    g.add_argument("--traces", action="store_true",
                   help="keep traces even without --api-key: then anyone who can reach the "
                        "port reads every prompt and completion (off: no traces without keys)")
    g.add_argument("--trace-withheld", action="store_true",
                   help="--trace-dir files keep the token ids and logprobs of blocked choices "
                        "(otherwise redacted, as for every caller but the admin key)")
    g.add_argument("--guard-client-override", action="store_true",
                   help="let requests loosen the server's guard (lower the mode, turn checks "
                        "off); otherwise it is a floor they may only tighten")


def _guard_config(args: argparse.Namespace) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    path: Path | None = args.checks_config
    if path is not None:
        import json
        import tomllib

        try:
            text = path.read_text()
            checks = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as exc:     # TOMLDecodeError and JSONDecodeError too
            raise AssertionError(f"--checks-config {path}: {exc}") from None
        assert isinstance(checks, dict), f"--checks-config {path}: must hold an object"
    return {"guard_mode": args.guard_mode, "guard_release": args.guard_release,
            "guard_checks": checks, "guard_client_override": args.guard_client_override,
            "session_ttl_s": args.session_ttl, "session_store": args.session_store,
            "max_traces": args.max_traces,
            "trace_dir": args.trace_dir, "traces": args.traces,
            "trace_withheld": args.trace_withheld}


_ENGINE_HELP = {
    "dtype": "the model body's dtype (the lm_head's logits stay fp32-accurate); auto: bf16 on a "
             "GPU and where the CPU computes bf16 natively (AMX, AVX512-BF16), else fp32",
    "head_precision": "how the lm_head computes its fp32-accurate logits; auto: split-bf16 (sums "
                      "of bf16 products) where the CPU has AMX, the body is bf16 and it measures "
                      "faster at load, else fp32",
    "device": "where the model runs; auto: cuda when torch sees a GPU (cpu in deterministic mode)",
    "enable_cuda_graphs": "run every decode step eagerly on cuda (no CUDA graphs)",
    "max_num_seqs": "sequences running at once (also the gateway's slot count)",
    "max_model_len": "0: the model's own context length",
    "kv_cache_memory_mb": "KV cache size when --num-kv-blocks is 0",
    "num_threads": "torch threads; 0: torch's default",
    "cpu_bind": "pin the compute thread's OpenMP team, one core per thread, and keep the event "
                "loop off those cores: auto (only when cores are left for the loop), none, or "
                "a CPU list such as 2-5",
    "enable_prefix_caching": "compute every prompt in full (no KV reuse across requests)",
}


# Where the server's default differs from the library's (EngineConfig): the server picks the
# GPU when there is one, the fastest body for its device and pins its compute threads where
# cores are left for the loop; an embedding program keeps the CPU, fp32 and its threads where
# they are unless it asks.
_SERVE_DEFAULTS = {"dtype": "auto", "device": "auto", "cpu_bind": "auto"}


def _add_engine_options(group: Any) -> None:
    """One option per EngineConfig field, so the CLI follows the engine as it grows."""
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = _ENGINE_HELP.get(f.name, "")
        if f.default is True:          # enable_chunked_prefill -> --no-chunked-prefill
            name = f.name.removeprefix("enable_").replace("_", "-")
            group.add_argument(f"--no-{name}", dest=f.name, action="store_false", help=help_text)
        elif f.default is False:
            group.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        elif typing.get_origin(hints[f.name]) is typing.Literal:
            group.add_argument(flag, dest=f.name, choices=typing.get_args(hints[f.name]),
                               default=_SERVE_DEFAULTS.get(f.name, f.default), help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=type(f.default),
                               default=_SERVE_DEFAULTS.get(f.name, f.default), help=help_text)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    keys = list(args.api_key)
    if args.api_key_file is not None:
        keys += [line.strip() for line in args.api_key_file.read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
    engine = EngineConfig(model=args.model, **{
        f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if f.name != "model"})
    from engine.device import DeviceUnavailable, choose_device   # torch: only when serving

    try:
        choose_device(engine)          # --device cuda without a GPU: say so now, not after loading
    except DeviceUnavailable as exc:
        raise AssertionError(str(exc)) from None
    return GatewayConfig(
        engine=engine, host=args.host, port=args.port, served_model_name=args.served_model_name,
        api_keys=tuple(keys), admin_key=_admin_key(args),
        max_queued_requests=args.max_queued_requests, max_body_bytes=args.max_body_bytes,
        keepalive_interval_s=args.keepalive_interval,
        drain_timeout_s=args.drain_timeout,
        log_json={"auto": None, "json": True, "console": False}[args.log_format],
        log_level=args.log_level, strict_fields=args.strict_fields, ui=args.ui,
        **_guard_config(args))


def _admin_key(args: argparse.Namespace) -> str:
    # The environment keeps the key out of `ps` output; the flag wins when both are given.
    key = getattr(args, "admin_key", None)
    if key is None:
        key = os.environ.get("PLUMBLINE_ADMIN_KEY")
    return (key or "").strip()


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import begin_drain, create_app
    from gateway.state import Runtime

    config = config_from_args(args)
    logs.configure(config.log_json, config.log_level)
    if args.replicas:    # loaded by name: cluster/ imports the gateway, never the reverse
        assert args.replicas > 0, "--replicas must be >= 1"
        code: int = importlib.import_module("cluster.app").serve_cluster(
            config, args.replicas, args.ray_address, args.ray_http_proxy)
        return code
    app = create_app(config)
    runtime: Runtime = app.state.runtime

    class Server(uvicorn.Server):
        """uvicorn, plus our drain on the first SIGTERM/SIGINT and an exit if loading fails."""

        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            self.loop.create_task(self._exit_if_load_fails())
            await super().startup(sockets)
            if not self.should_exit:
                log.info("server_listening", url=f"http://{config.host}:{config.port}",
                         model=config.model_name, auth=bool(config.api_keys))

        async def _exit_if_load_fails(self) -> None:
            while runtime.engine is None and runtime.load_error is None:
                await asyncio.sleep(0.1)
            if runtime.load_error is not None:
                self.should_exit = True

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.loop is not None and not runtime.is_draining:
                self.loop.call_soon_threadsafe(begin_drain, runtime)
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(
        app, host=config.host, port=config.port, access_log=False, log_level=config.log_level,
        # our own drain aborts at drain_timeout_s; uvicorn's cut-off is only the backstop
        timeout_graceful_shutdown=int(config.drain_timeout_s) + 5))
    server.run()
    return 1 if runtime.load_error is not None else 0


# Client programs of the server, not part of it: each module is imported only when its
# subcommand runs, and its own `add_arguments` reads the rest of the command line (--help too).
_PROGRAMS: dict[str, tuple[str, str]] = {
    "loadtest": ("loadtests.run", "run the Locust load test headless and write a report"),
    "verify": ("clients.verify", "check a server's logprobs, determinism and schemas"),
}


def _add_programs(sub: Any) -> None:
    for name, (module, summary) in _PROGRAMS.items():
        p = sub.add_parser(name, help=summary, add_help=False)
        p.set_defaults(func=functools.partial(_run_program, name), forwards_args=True)


def _run_program(name: str, args: argparse.Namespace) -> int:
    module, summary = _PROGRAMS[name]
    program = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=f"plumbline {name}", description=summary,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    program.add_arguments(parser)
    code: int = program.run(parser.parse_args(args.program_args))
    return code


_COMMANDS: list[Callable[[Any], None]] = [_add_serve, _add_programs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plumbline", description="plumbline LLM server")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "forwards_args", False):
        args.program_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        code: int = args.func(args)
    except AssertionError as exc:      # a config check failed: say which, no traceback
        print(f"plumbline: invalid configuration: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
