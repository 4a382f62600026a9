"""What an RL pipeline needs from the server besides tokens: `GET /v1/server_info` (every setting
that changes numerics or scheduling, so two runs can be compared) and `POST /v1/admin/weights`
(swap in new weights while serving).

The admin endpoints take their own key (`--admin-key`), never an API key: a client allowed to
generate is not thereby allowed to replace the model. Without an admin key they do not exist
(404), so a server started without one cannot be reconfigured by anybody.
"""
from __future__ import annotations

import dataclasses
import hmac
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread
import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.protocol import BadRequest, NotFound, Unauthorized, parse
from gateway.requests import read_json, runtime
from gateway.state import Runtime

log = structlog.get_logger("plumbline.gateway")

# Distributions whose versions change numerics (torch kernels, tokenizers, grammar masks).
_LIBRARIES = ("plumbline", "torch", "transformers", "tokenizers", "safetensors", "numpy",
              "triton", "llguidance", "outlines-core", "xgrammar", "jsonschema", "starlette",
              "uvicorn", "pydantic")
ADMIN_PREFIX = "/v1/admin/"


def library_versions() -> dict[str, str | None]:
    """Installed versions (None: not installed), plus the Python version."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def server_info_body(rt: Runtime) -> dict[str, Any]:
    """The settings in force; fields only the loaded engine knows are None while it loads."""
    cfg = rt.config.engine
    engine = rt.engine
    stats = engine.stats() if engine is not None else None
    loaded = engine.server_info() if engine is not None else {}
    return {
        "object": "server_info",
        "ready": rt.is_ready,
        "model": {
            "id": rt.config.model_name,
            "source": cfg.model,                      # the --model argument
            "path": loaded.get("model_path"),
            "architecture": loaded.get("architecture"),
            "vocab_size": loaded.get("vocab_size"),
            "weights_version": None if engine is None else engine.weights_version,
            "weights_source": rt.weights_source,      # None: the weights loaded at start
        },
        "numerics": {
            "dtype": loaded.get("dtype", cfg.dtype),          # as chosen ("auto" resolved)
            "dtype_asked": cfg.dtype,
            "dtype_reason": loaded.get("dtype_reason"),
            # the final projection's logits are fp32-accurate whatever the body's dtype: fp32, or
            # split-bf16, sums of bf16 products (kernels/split_head.py)
            "lm_head_dtype": loaded.get("lm_head_dtype", "float32"),
            "lm_head_precision": loaded.get("lm_head_precision", cfg.head_precision),
            "lm_head_precision_asked": cfg.head_precision,
            "lm_head_reason": loaded.get("lm_head_reason"),
            "deterministic": cfg.deterministic,
            # op -> the batch-invariant kernel it runs (kernels/invariant.py); None: mode off
            "deterministic_kernels": loaded.get("deterministic_kernels"),
            "default_logprobs_mode": "processed",
            "prompt_logprobs_mode": "raw",
            "sampler_order": ["penalties", "grammar_mask", "temperature", "top_k", "top_p",
                              "min_p", "log_softmax"],
            "seed": cfg.seed,
            # the compute thread's (the gateway's own thread may count differently)
            "num_threads": loaded.get("num_threads", torch.get_num_threads()),
            # CPUs the compute thread's OpenMP team is pinned to ([]: not pinned) and why
            "cpu_bind": loaded.get("cpu_bind"),
            "cpu_bind_asked": cfg.cpu_bind,
            "cpu_bind_loop": loaded.get("cpu_bind_loop"),
            "cpu_bind_reason": loaded.get("cpu_bind_reason"),
            "device": loaded.get("device"),                   # as chosen ("auto" resolved)
            "device_asked": cfg.device,
            "device_reason": loaded.get("device_reason"),
            # decode batch sizes replayed from CUDA graphs; None: none (CPU, or turned off)
            "cuda_graphs": loaded.get("cuda_graphs"),
        },
        "scheduling": {
            "max_num_seqs": cfg.max_num_seqs,
            "max_num_batched_tokens": cfg.max_num_batched_tokens,
            "max_model_len": rt.max_model_len if engine is not None else None,
            "enable_chunked_prefill": cfg.enable_chunked_prefill,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "block_size": cfg.block_size,
            "num_kv_blocks": None if stats is None else stats.num_blocks,
            "max_queued_requests": rt.config.max_queued_requests,
        },
        "grammar": {"backend": cfg.grammar_backend,
                    "compile_timeout_s": cfg.grammar_compile_timeout},
        # every EngineConfig field as given, so a field added later is reported without a change
        "engine_config": dataclasses.asdict(cfg),
        "versions": library_versions(),
        "admin": {"weights_update": bool(rt.config.admin_key)},
    }


async def server_info(request: Request) -> Response:
    return JSONResponse(server_info_body(runtime(request)))


# ------------------------------------------------------------------------------ weight updates


class WeightsUpdateRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    path: str = Field(min_length=1)             # a .safetensors file or an HF-format directory
    mode: Literal["pause", "drain", "abort"] = "pause"
    reset_cache: bool = False


def check_admin(rt: Runtime, request: Request) -> None:
    """404 when no admin key is configured; 401 unless the request carries it (as a Bearer
    token or in X-Admin-Key)."""
    if not rt.config.admin_key:
        raise NotFound("admin endpoints are disabled; start the server with --admin-key "
                       "(or PLUMBLINE_ADMIN_KEY) to enable them", code="admin_disabled")
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    token = request.headers.get("x-admin-key", token)
    if not hmac.compare_digest(token.encode(), rt.config.admin_key.encode()):
        raise Unauthorized("missing or invalid admin key; send 'Authorization: Bearer "
                           "<admin key>'", headers={"WWW-Authenticate": "Bearer"})


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a .safetensors file or an HF directory; ValueError says what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from engine.loader import load_state_dict

    if not path.exists():
        raise ValueError(f"{path} does not exist")
    try:
        if path.is_dir():
            return load_state_dict(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is neither a .safetensors file nor a directory")
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} cannot be read as safetensors: {exc}") from None


async def update_weights(request: Request) -> Response:
    rt = runtime(request)
    check_admin(rt, request)
    engine, _ = rt.ready()
    req = parse(WeightsUpdateRequest, await read_json(request, rt.config.max_body_bytes))
    path = Path(req.path).expanduser()
    t0 = time.perf_counter()
    try:
        state = await anyio.to_thread.run_sync(read_weights_file, path)
    except ValueError as exc:
        raise BadRequest(f"path: {exc}", "path", code="invalid_weights") from None
    try:
        version: int = await engine.update_weights(state, mode=req.mode,
                                                   reset_cache=req.reset_cache)
    except (ValueError, KeyError, RuntimeError) as exc:
        # A missing tensor (KeyError), a shape mismatch (ValueError) or a bad dtype/size: the
        # weights do not fit this model; the engine never swapped, so serving goes on unchanged.
        message = (f"missing tensor {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args
                   else str(exc))
        log.warning("weights_update_refused", path=str(path), error=message)
        raise BadRequest(f"path: the weights do not fit this model: {message}", "path",
                         code="invalid_weights") from None
    rt.weights_source = str(path.resolve())    # absolute: verify loads the same file
    duration = time.perf_counter() - t0
    log.info("weights_update_done", path=str(path), version=version, mode=req.mode,
             reset_cache=req.reset_cache, duration_s=round(duration, 3))
    return JSONResponse({"object": "weights_update", "weights_version": version,
                         "mode": req.mode, "reset_cache": req.reset_cache, "path": str(path),
                         "duration_s": round(duration, 3)})
