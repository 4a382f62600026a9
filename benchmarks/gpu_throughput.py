"""Decode throughput on a GPU: plumbline against transformers `generate` (bf16, one padded static
batch) and vLLM (when importable), at 1 / 8 / 32 / 128 concurrent streams.

    python -m benchmarks.gpu_throughput [--streams 1 8 32 128] [--out gpu.md]
    python -m benchmarks.gpu_throughput --device cpu --dry-run     # the CPU-side logic, small

Every stream has a ~100-token prompt and generates 128 tokens (greedy, EOS ignored); the figure
is generated tokens / wall time of the whole batch (prefill included), each system in a fresh
process so GPU memory and CUDA graphs do not carry over. plumbline runs its offline `LLM` (the
engine's own steps, no HTTP). Also printed: the single-stream bound from memory bandwidth
(bytes of weights one decode step reads / a device-to-device copy's measured bandwidth), the
issue's yardstick for one stream. Writes a markdown table (--out) and prints it.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FILLER = ("The history of computing is a story of abstractions layered one on another, from "
          "switches and vacuum tubes to transistors, compilers, operating systems and networks. ")


def prompts(tok: Any, count: int, num_tokens: int) -> list[list[int]]:
    """count distinct prompts of num_tokens tokens (distinct: no prefix-cache hits between them)."""
    return [tok(f"Request {i}. " + FILLER * (num_tokens // 20 + 2)).input_ids[:num_tokens]
            for i in range(count)]


def plumbline_tps(args: argparse.Namespace, streams: int) -> float:
    from engine import LLM, SamplingParams

    llm = _cached("llm", lambda: LLM(args.model, device=args.device, dtype=args.dtype,
                                     max_num_seqs=max(args.streams),
                                     max_num_batched_tokens=args.batched_tokens,
                                     kv_cache_memory_mb=args.kv_cache_mb,
                                     enable_prefix_caching=False))
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    batch = prompts(llm.tokenizer, streams, args.prompt_tokens)
    llm.generate(batch[:1], SamplingParams(max_tokens=2, temperature=0.0))   # warm
    t0 = time.perf_counter()
    outs = llm.generate(batch, params)
    seconds = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / seconds


def transformers_tps(args: argparse.Namespace, streams: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.loader import resolve_model

    path = str(resolve_model(args.model))
    tok = _cached("tok", lambda: AutoTokenizer.from_pretrained(path, padding_side="left"))
    model = _cached("hf", lambda: AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, args.dtype)).to(args.device).eval())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = prompts(tok, streams, args.prompt_tokens)
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=args.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
    with torch.inference_mode():
        model.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=2,
                       do_sample=False, pad_token_id=pad)                          # warm
        _sync(args.device)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
        _sync(args.device)
    return (out.shape[1] - width) * streams / (time.perf_counter() - t0)


def vllm_tps(args: argparse.Namespace, streams: int) -> float:
    import vllm
    from transformers import AutoTokenizer

    from engine.loader import resolve_model

    path = str(resolve_model(args.model))
    llm = _cached("vllm", lambda: vllm.LLM(path, dtype=args.dtype, max_num_seqs=max(args.streams),
                                           enable_prefix_caching=False,
                                           gpu_memory_utilization=0.5))
    batch = prompts(AutoTokenizer.from_pretrained(path), streams, args.prompt_tokens)
    params = vllm.SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / seconds


SYSTEMS: dict[str, Callable[[argparse.Namespace, int], float]] = {
    "plumbline": plumbline_tps, "transformers (static batch)": transformers_tps, "vLLM": vllm_tps}
_CACHE: dict[str, Any] = {}


def _cached(key: str, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_system(name: str, args: argparse.Namespace) -> list[float | str]:
    """tokens/s at each of args.streams (an error's message where a run failed)."""
    row: list[float | str] = []
    for n in args.streams:
        try:
            row.append(SYSTEMS[name](args, n))
        except Exception as exc:   # noqa: BLE001: a failed system is a table cell, not a crash
            row.append(f"failed: {type(exc).__name__}: {str(exc)[:80]}")
    return row


def _child(name: str, args: argparse.Namespace, out: Any) -> None:
    out.put(run_system(name, args))


def in_fresh_process(name: str, args: argparse.Namespace, timeout: float) -> list[float | str]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, args, queue))
    proc.start()
    try:
        return queue.get(timeout=timeout)
    except Exception:   # noqa: BLE001: queue.Empty: it ran out of time
        return [f"timed out after {timeout:.0f} s"] * len(args.streams)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()


def bandwidth_bound(args: argparse.Namespace) -> str:
    """Single-stream decode bound: weight bytes a decode step reads / measured copy bandwidth."""
    from safetensors import safe_open

    from engine.loader import resolve_model

    body = 2 if args.dtype == "bfloat16" else 4
    total = 0
    for f in sorted(Path(resolve_model(args.model)).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                numel = st.get_slice(key).get_shape()
                count = 1
                for d in numel:
                    count *= d
                if "embed_tokens" not in key:       # an embedding reads one row per token
                    total += count * (4 if key == "lm_head.weight" else body)
    if args.device != "cuda":
        return f"weights read per decode step: {total / 1e6:.0f} MB (bandwidth not measured on cpu)"
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * 10 * x.numel() / (time.perf_counter() - t0)        # read + write
    return (f"weights read per decode step: {total / 1e6:.0f} MB; copy bandwidth "
            f"{bw / 1e9:.0f} GB/s; single-stream bound {bw / total:.0f} tokens/s")


def table(args: argparse.Namespace, rows: dict[str, list[float | str]], device_name: str,
          bound: str) -> str:
    head = "| system | " + " | ".join(f"{n} streams" for n in args.streams) + " |"
    lines = [f"Device: {device_name}; dtype {args.dtype}; {args.prompt_tokens}-token prompts, "
             f"{args.new_tokens} new tokens; generated tokens/s.", "", head,
             "|---" * (len(args.streams) + 1) + "|"]
    for name, row in rows.items():
        cells = [c if isinstance(c, str) else f"{c:.1f}" for c in row]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    base = rows.get("transformers (static batch)")
    if base is not None and isinstance(rows["plumbline"][-1], float) and isinstance(base[-1], float):
        lines += ["", f"plumbline / transformers at {args.streams[-1]} streams: "
                      f"{rows['plumbline'][-1] / base[-1]:.2f}x"]
    return "\n".join(lines + ["", bound, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-mb", type=int, default=4096)
    p.add_argument("--timeout", type=float, default=170.0,
                   help="seconds for all systems together; each gets an equal share of what "
                        "is left when it starts (vLLM, last, gets the most if others finish early)")
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument("--dry-run", action="store_true",
                   help="small and in this process: 1 and 2 streams, 8-token prompts, 3 new "
                        "tokens, fp32, no vLLM (checks the script's own logic on a CPU)")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    if args.dry_run:
        args.streams, args.prompt_tokens, args.new_tokens = [1, 2], 8, 3
        args.dtype, args.no_vllm, args.kv_cache_mb, args.batched_tokens = "float32", True, 64, 64
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device (use --device cpu --dry-run off a GPU)", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    names = ["plumbline", "transformers (static batch)"]
    try:
        import vllm  # noqa: F401
        names += [] if args.no_vllm else ["vLLM"]
    except ImportError:
        print("vLLM is not importable here: no vLLM row", file=sys.stderr)
    rows = {}
    deadline = time.monotonic() + args.timeout
    for i, name in enumerate(names):
        share = (deadline - time.monotonic()) / (len(names) - i)
        rows[name] = run_system(name, args) if args.dry_run else in_fresh_process(name, args, share)
    _CACHE.clear()                      # a dry run's models, in this process
    text = table(args, rows, device_name, bandwidth_bound(args))
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
