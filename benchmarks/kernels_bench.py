"""Kernel timings next to the naive torch versions; bf16-vs-fp32 linear per shape.

    .venv/bin/python benchmarks/kernels_bench.py                 # CPU, every section
    .venv/bin/python benchmarks/kernels_bench.py --only mask attention --threads 1
    .venv/bin/python benchmarks/kernels_bench.py --only head --threads 2    # fp32 vs split-bf16
    .venv/bin/python benchmarks/kernels_bench.py --only attention --no-avx512  # numba's AVX2 code
    python benchmarks/kernels_bench.py --device cuda             # Triton kernels on a GPU

Each figure is the median of several runs, in milliseconds. Shapes are the default model's
(SmolLM2-135M: hidden 576, 9 heads / 3 kv heads, head_dim 64, vocab 49152), block size 16.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import AttentionMetadata, slots_for  # noqa: E402
from kernels.calibrate import median_ms as timed_ms, medians_ms  # noqa: E402
from kernels import (attention, calibrate, decode_cpu, kv_store, linear, logit_mask, rmsnorm,  # noqa: E402
                     rotary, split_head)
from kernels.backend import cpu_flags  # noqa: E402
from benchmarks.cpu import cpu_line, no_avx512_env  # noqa: E402
from benchmarks.engine_ab import module_values  # noqa: E402

PLAIN_DECODE = ["kernels.decode_cpu.WIDEN_ONCE=false"]    # module_values: the decode's plain loops

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, VOCAB, BLOCK = 9, 3, 64, 576, 49152, 16


def median_ms(fn: Callable[[], object], repeats: int, device: str) -> float:
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median"))
    return timed_ms(fn, repeats)     # the same timing loop kernels.calibrate uses


def row(name: str, **cols: float | str) -> None:
    cells = "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in cols.items())
    print(f"{name:<44} {cells}")


def bench_mask(device: str, repeats: int) -> None:
    print("# bitmask apply, [32, 49152] fp32 (ms)")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, VOCAB, generator=g).to(device)
    words = (VOCAB + 31) // 32
    random_mask = torch.randint(-2**31, 2**31 - 1, (32, words), generator=g, dtype=torch.int64)
    random_mask = random_mask.to(torch.int32).to(device)
    mixed = random_mask.clone()
    mixed[::2] = -1                                    # half the rows unconstrained
    bias = torch.zeros_like(logits)
    for label, mask in (("random bits, all rows", random_mask), ("half rows unconstrained", mixed)):
        work = logits.clone()
        fast = median_ms(lambda: logit_mask.apply_token_bitmask(work, mask), repeats, device)
        naive = median_ms(lambda: logit_mask.apply_token_bitmask_ref(work, mask), max(3, repeats // 5), device)
        dense = median_ms(lambda: work.add_(bias), repeats, device)
        row(f"  {label}", kernel=fast, naive_masked_fill=naive, dense_bias_add=dense)


def make_attention_case(num_seqs: int, context: int, new_tokens: int, dtype: torch.dtype,
                        device: str):
    """num_seqs sequences of ~context cached keys (ragged +-25%), new_tokens queries each."""
    g = torch.Generator().manual_seed(num_seqs * 7 + context)
    lens = torch.randint(int(context * 0.75), int(context * 1.25) + 1, (num_seqs,), generator=g).tolist()
    need = [(c + new_tokens + BLOCK - 1) // BLOCK for c in lens]
    num_blocks = sum(need) + 8
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for k in need:
        tables.append(perm[used:used + k])
        used += k
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    q = torch.randn(num_seqs * new_tokens, HEADS, HEAD_DIM, generator=g).to(dtype).to(device)
    all_slots = [slots_for(t, c + new_tokens, BLOCK) for t, c in zip(tables, lens)]
    width = max(need)
    meta = AttentionMetadata(
        torch.zeros(0, dtype=torch.long, device=device), num_seqs if new_tokens == 1 else 0,
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                  dtype=torch.int32).to(device),
        seq_lens=torch.tensor([c + new_tokens for c in lens], dtype=torch.int32).to(device),
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32).mul(new_tokens).to(device),
        max_query_len=new_tokens)
    return q, k_cache, v_cache, meta, lens, all_slots


def padded_slots(all_slots: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode rows' key slots padded to the longest row (padding -> slot 0), and the mask
    [rows, 1, 1, max_len] (True = attend) that the naive gather and dense SDPA take."""
    max_len = max(len(s) for s in all_slots)
    mask = torch.zeros(len(all_slots), 1, 1, max_len, dtype=torch.bool)
    for b, s in enumerate(all_slots):
        mask[b, 0, 0, :len(s)] = True
    return torch.tensor([s + [0] * (max_len - len(s)) for s in all_slots]), mask


def naive_paged_attention(q, k_cache, v_cache, slots, mask, scale):  # type: ignore[no-untyped-def]
    """The engine's first version: gather every key by slot, then SDPA."""
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    k_flat, v_flat = k_cache.view(-1, kvh, d), v_cache.view(-1, kvh, d)
    nd = slots.shape[0]
    qd = q[:nd].view(nd, kvh, -1, d)
    k = k_flat[slots].transpose(1, 2)
    v = v_flat[slots].transpose(1, 2)
    return F.scaled_dot_product_attention(qd, k, v, attn_mask=mask, scale=scale)


def bench_attention(device: str, repeats: int, dtypes: list[torch.dtype]) -> None:
    scale = HEAD_DIM ** -0.5
    print("# paged decode attention, 9 q / 3 kv heads, d=64, block 16 (ms)")
    for dtype in dtypes:
        for num_seqs, context in ((1, 512), (8, 256), (32, 256), (64, 512)):
            q, kc, vc, meta, lens, all_slots = make_attention_case(num_seqs, context, 1, dtype, device)
            slots, mask = padded_slots(all_slots)
            max_len = slots.shape[1]
            # The same keys held contiguously: dense SDPA, the 1.5x target's yardstick.
            kd = torch.randn(num_seqs, KV_HEADS, max_len, HEAD_DIM, dtype=dtype, device=device)
            vd = torch.randn_like(kd)
            qd = q.view(num_seqs, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
            mask = mask.to(device)
            dense = median_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale),
                              repeats, device)
            fast = median_ms(lambda: attention.paged_attention(q, kc, vc, meta, scale), repeats, device)
            cols: dict[str, float | str] = {"kernel": fast, "dense_sdpa": dense, "ratio": fast / dense}
            if device == "cpu":     # each key widened per query head, reduced on its own
                with module_values(PLAIN_DECODE):
                    cols["plain_loops"] = median_ms(
                        lambda: attention.paged_attention(q, kc, vc, meta, scale), repeats, device)
            slots = slots.to(device)
            cols["naive_gather"] = median_ms(
                lambda: naive_paged_attention(q, kc, vc, slots, mask, scale), repeats, device)
            row(f"  {str(dtype)[6:]} seqs={num_seqs} ctx~{context}", **cols)
    print("# paged prefill attention, causal over cached + new keys (ms): the engine's kernel "
          "(on the CPU kernels/prefill_cpu.py, one call for every prefill), SDPA one call per "
          "prompt (the CPU path before it), the naive reference")
    for dtype in dtypes:
        for num_seqs, context, new in ((1, 0, 256), (5, 0, 100), (4, 128, 64)):
            q, kc, vc, meta, lens, _ = make_attention_case(num_seqs, context, new, dtype, device)
            fast = median_ms(lambda: attention.paged_attention(q, kc, vc, meta, scale), repeats, device)
            cols: dict[str, float | str] = {"kernel": fast}
            if device == "cpu":
                attention.PREFILL_IN_PLACE = False
                try:
                    cols["sdpa_per_prompt"] = median_ms(
                        lambda: attention.paged_attention(q, kc, vc, meta, scale), repeats, device)
                finally:
                    attention.PREFILL_IN_PLACE = True
                cols["kernel_over_sdpa"] = fast / float(cols["sdpa_per_prompt"])
            cols["naive_reference"] = median_ms(lambda: attention.paged_attention_ref(
                q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale),
                max(3, repeats // 5), device)
            row(f"  {str(dtype)[6:]} seqs={num_seqs} cached~{context} new={new}", **cols)


def bench_store(device: str, repeats: int) -> None:
    print("# KV store by slot mapping, 3 kv heads x 64 (ms)")
    for num_tokens in (32, 512):
        kc = torch.zeros(4096, BLOCK, KV_HEADS, HEAD_DIM, device=device)
        vc = torch.zeros_like(kc)
        key = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, device=device)
        value = torch.randn_like(key)
        slots = torch.randperm(4096 * BLOCK)[:num_tokens].to(device)
        fast = median_ms(lambda: kv_store.store_kvcache(key, value, kc, vc, slots), repeats, device)
        naive = median_ms(lambda: kv_store.store_kvcache_ref(key, value, kc, vc, slots),
                          max(3, repeats // 5), device)
        row(f"  tokens={num_tokens}", kernel=fast, naive_per_token=naive)


def bench_norm_rotary(device: str, repeats: int, dtypes: list[torch.dtype]) -> None:
    print("# RMSNorm + residual (hidden 576) and rotary (9 + 3 heads, d=64) (ms)")
    for dtype in dtypes:
        for num_tokens in (1, 32, 256):
            x = torch.randn(num_tokens, HIDDEN, device=device).to(dtype)
            r, w = torch.randn_like(x), torch.randn(HIDDEN, device=device).to(dtype)
            fast = median_ms(lambda: rmsnorm.rms_norm(x, w, 1e-5, r), repeats, device)
            ref = median_ms(lambda: rmsnorm.rms_norm_ref(x, w, 1e-5, r), repeats, device)
            q = torch.randn(num_tokens, HEADS, HEAD_DIM, device=device).to(dtype)
            k = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, device=device).to(dtype)
            cos = torch.randn(num_tokens, HEAD_DIM, device=device)
            sin = torch.randn_like(cos)
            rfast = median_ms(lambda: rotary.apply_rotary(q, k, cos, sin), repeats, device)
            rref = median_ms(lambda: rotary.apply_rotary_ref(q, k, cos, sin), repeats, device)
            # What the model calls: rotary + KV store from the qkv output, one call against two.
            qkv = torch.randn(num_tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=device).to(dtype)
            kc = torch.zeros(4096, BLOCK, KV_HEADS, HEAD_DIM, device=device).to(dtype)
            vc = torch.zeros_like(kc)
            slots = torch.randperm(4096 * BLOCK)[:num_tokens].to(device)
            q_, k_, v_ = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)

            def unfused() -> None:
                _, kr = rotary.apply_rotary(q_.view(-1, HEADS, HEAD_DIM),
                                            k_.view(-1, KV_HEADS, HEAD_DIM), cos, sin)
                kv_store.store_kvcache(kr, v_.view(-1, KV_HEADS, HEAD_DIM), kc, vc, slots)
            fused = median_ms(lambda: rotary.rotate_and_store(qkv, HEADS, KV_HEADS, cos, sin, kc, vc,
                                                              slots), repeats, device)
            row(f"  {str(dtype)[6:]} tokens={num_tokens}", rms=fast, rms_naive=ref,
                rotary=rfast, rotary_naive=rref, rotary_store=fused,
                rotary_then_store=median_ms(unfused, repeats, device))


def bench_linear(repeats: int) -> None:
    print("# linear per shape and rows (ms): F.linear fp32 (MKL), fp32 on oneDNN's prepacked weight,"
          " fp32 on our panels (kernels.linear, the default); a bf16 layer: F.linear bf16 on the"
          " plain weight, oneDNN bf16 on the weight prepacked in bf16 (its bf16 branch), its"
          " small-product branch (kernels.dot_bf16 where the CPU has AVX512-BF16, else fp32 on"
          " bf16 panels), fp32 on bf16 panels; dispatch = kernels.linear's choice for a bf16 body"
          " (the lm_head's: calibrate_panels');"
          f" {cpu_line()}")
    shapes = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576),
              "lm_head": (576, 49152)}
    for name, (n_in, n_out) in shapes.items():
        w32 = torch.randn(n_out, n_in)
        onednn = linear.LinearWeight(w32, None, packed=torch.ops.mkldnn._reorder_linear_weight(
            w32, linear.PACK_ROWS_HINT))
        panels = linear.prepare_linear(w32)
        assert panels.panels is not None
        w16 = w32.bfloat16()
        layer16 = linear.prepare_linear(w16)
        with _env("PLUMBLINE_DOT_BF16", "0"):
            layer16p = linear.prepare_linear(w16)      # bf16 panels for the fp32 panel GEMM
        # what the engine measures as it loads: the fp32 lm_head's oneDNN crossover, a body
        # layer's bf16 one
        head_onednn_rows = linear.NEVER
        if name == "lm_head":
            head_onednn_rows = calibrate.calibrate_panels(linear.prepare_linear(w32))
        else:
            calibrate.calibrate([(n_in, n_out)])
        for rows in (1, 2, 8, 32, 64, 256, 512):
            x32 = torch.randn(rows, n_in)
            x16 = x32.bfloat16()
            reps = repeats if n_out < 10000 else max(3, repeats // 4)
            t32 = median_ms(lambda: F.linear(x32, w32), reps, "cpu")
            tdnn = median_ms(lambda: linear.apply_linear(x32, onednn), reps, "cpu")
            tpan = median_ms(lambda: linear.apply_linear(x32, panels), reps, "cpu")
            t16 = median_ms(lambda: F.linear(x16, w16), reps, "cpu")
            t16p = median_ms(lambda: linear.linear_bf16(x16, layer16), reps, "cpu")
            t16b = median_ms(lambda: linear.linear_below(x16, layer16), reps, "cpu")
            t16f = median_ms(lambda: linear.linear_fp32(x16, layer16p), reps, "cpu")
            choice = ("bf16" if linear.use_bf16(rows, n_in, n_out, linear.below(layer16))
                      else linear.below(layer16))
            if name == "lm_head":
                path = "oneDNN" if rows >= head_onednn_rows else "panels"
                choice = f"fp32 on {path} (logits stay fp32 by contract)"
            row(f"  {name} {n_in}->{n_out} rows={rows}", fp32=t32, onednn=tdnn, panels=tpan,
                onednn_over_panels=tdnn / tpan, bf16_plain=t16, bf16_prepacked=t16p,
                bf16_below=t16b, fp32_on_bf16_panels=t16f, dispatch=choice)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def bench_body(repeats: int, layers: int = 30) -> None:
    """The bf16 body's GEMMs of one decode step of SmolLM2-135M (its four layer shapes, `layers`
    layers each, random weights: 212 MB, read from memory as in a decode step), each branch a
    bf16 layer can take: oneDNN's bf16 product, the dot-product GEMM (kernels.dot_bf16, where
    the CPU has AVX512-BF16), and the fp32 panel GEMM on bf16 panels. Then the gate_up layers
    alone with silu(gate) * up: the dot product and torch's silu * up after it, against the one
    fused call (kernels.linear.gate_up_silu on a prepare_gate_up layer). Medians of `repeats`
    passes, the variants in alternation."""
    print(f"# bf16 body GEMMs of one decode step, {layers} layers x 4 shapes, ms; {cpu_line()}")
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
    weights = [torch.randn(n_out, n_in).bfloat16() for n_in, n_out in shapes for _ in range(layers)]
    dot = [linear.prepare_linear(w) for w in weights]
    with _env("PLUMBLINE_DOT_BF16", "0"):
        panels = [linear.prepare_linear(w) for w in weights]
    has_dot = dot[0].pairs is not None
    if not has_dot:
        print("#   no AVX512-BF16 dot product here: the dot and gate_up columns are absent")
    plain_gate_up = [lw for lw in dot if lw.shape == (3072, 576)]
    gated = [linear.prepare_gate_up(w) for w in weights if w.shape == (3072, 576)]
    for rows in (1, 2, 4, 8, 16, 32, 64):
        xs = {n_in: torch.randn(rows, n_in).bfloat16() for n_in, _ in shapes}
        fns = [lambda: [linear.linear_bf16(xs[lw.shape[1]], lw) for lw in dot],
               lambda: [linear.linear_fp32(xs[lw.shape[1]], lw).bfloat16() for lw in panels]]
        if has_dot:
            fns += [lambda: [linear.linear_below(xs[lw.shape[1]], lw) for lw in dot],
                    lambda: [linear.silu_mul(linear.linear_below(xs[576], lw)) for lw in plain_gate_up],
                    lambda: [linear.gate_up_silu(xs[576], lw) for lw in gated]]
        times = medians_ms(fns, repeats)
        cols = dict(onednn_bf16=times[0], fp32_on_bf16_panels=times[1])
        if has_dot:
            cols.update(dot_bf16=times[2], dot_over_onednn=times[2] / times[0],
                        gate_up_then_silu=times[3], gate_up_silu_fused=times[4])
        row(f"  rows={rows}", **cols)


def bench_head(repeats: int, rounds: int = 5) -> None:
    """The lm_head both ways it is fp32-accurate: fp32 (the panel GEMM, the engine's fp32 head)
    and split-bf16 (kernels/split_head.py) as the engine runs it on this CPU (oneDNN with AMX,
    else bf16 panels), and through oneDNN whatever the CPU (what AMX CPUs run); then two
    references that are not the engine's: the split with K tripled in one oneDNN GEMM
    ([x_hi|x_hi|x_lo] . [w_hi|w_lo|w_hi], three products, 3/2 the weight bytes), and a plain
    bf16 head (bf16 output: not fp32-accurate). Rounds alternate the variants; each figure is
    the median over rounds of a median of `repeats` calls."""
    amx = "amx_bf16" in cpu_flags()
    print(f"# lm_head {HIDDEN}->{VOCAB}, fp32-accurate logits (ms); {cpu_line()}")
    if not amx:
        print("#   no amx_bf16: the engine's split head runs on bf16 panels, and oneDNN runs its "
              "bf16 products as fp32 FMA here (its bf16 math mode is AMX-only); the AMX figure "
              "needs a CPU with AMX")
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.05
    fp32 = linear.prepare_linear(weight.clone())
    split = split_head.prepare_split_head(weight)
    split_onednn = split_head.prepare_split_head(weight, onednn=True)
    hi, lo = split_head.split_bf16(weight)
    tripled = torch.ops.mkldnn._reorder_linear_weight(torch.cat([hi, lo, hi], 1), linear.PACK_ROWS_HINT)
    w16 = weight.bfloat16()

    def k_tripled(x: torch.Tensor) -> torch.Tensor:
        x_hi, x_lo = split_head.split_bf16(x)
        with split_head._bf16_products():
            return torch.ops.mkldnn._linear_pointwise(torch.cat([x_hi, x_hi, x_lo], 1), tripled,
                                                      None, "none", [], "")
    for rows in (1, 8, 32):
        x = torch.randn(rows, HIDDEN, generator=g)
        x16 = x.bfloat16()
        variants = {"fp32": lambda: linear.apply_linear(x, fp32),
                    "split_bf16": lambda: split_head.split_head_logits(x, split),
                    "split_onednn": lambda: split_head.split_head_logits(x, split_onednn),
                    "split_k_tripled": lambda: k_tripled(x),
                    "bf16_not_accurate": lambda: F.linear(x16, w16)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                times[name].append(median_ms(fn, repeats, "cpu"))
        cols: dict[str, float | str] = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        cols["split_over_fp32"] = float(cols["split_bf16"]) / float(cols["fp32"])
        row(f"  rows={rows}", **cols)


def _plain(fn: Callable[[], object]) -> Callable[[], object]:
    """fn with the CPU decode kernel's plain loops for every head size (what it ran before keys
    and values were widened once per group)."""
    def run() -> object:
        with module_values(PLAIN_DECODE):
            return fn()
    return run


def bench_placement(repeats: int, layers: int = 30, num_blocks: int = 2912) -> None:
    """The bf16 decode attention of one step (`layers` layers, each its own cache of num_blocks
    blocks: 2912 is the server's default 1 GiB of KV for SmolLM2-135M, too big for the caches)
    over rows whose blocks are consecutive in memory, as a fresh server hands them out, and
    scattered, as a long-running one reuses them; each also with the kernel's plain loops
    (PLAIN_DECODE). Medians of `repeats` passes, alternating."""
    print(f"# decode attention, {layers} layers, consecutive vs scattered KV blocks, ms; {cpu_line()}")
    g = torch.Generator().manual_seed(0)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    caches = [(torch.randn(shape, generator=g).bfloat16(), torch.randn(shape, generator=g).bfloat16())
              for _ in range(layers)]
    for seqs, keys in ((8, 200), (32, 200), (32, 600)):
        per = (keys + BLOCK - 1) // BLOCK
        tables = {"consecutive": torch.arange(seqs * per, dtype=torch.int32).view(seqs, per),
                  "scattered": torch.randperm(num_blocks, generator=g)[:seqs * per]
                  .to(torch.int32).view(seqs, per)}
        lens = torch.full((seqs,), keys, dtype=torch.int32)
        q = torch.randn(seqs, HEADS, HEAD_DIM, generator=g).bfloat16()
        fns = [lambda t=t: [decode_cpu.attend_rows_in_place(q, kc, vc, t, lens, HEAD_DIM ** -0.5)
                            for kc, vc in caches] for t in tables.values()]
        times = medians_ms(fns + [_plain(fn) for fn in fns], repeats)
        row(f"  seqs={seqs} keys={keys}", consecutive=times[0], scattered=times[1],
            scattered_over_consecutive=times[1] / times[0], consecutive_plain_loops=times[2],
            scattered_plain_loops=times[3], kernel_over_plain=f"{times[0] / times[2]:.2f} / "
            f"{times[1] / times[3]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", nargs="*",
                        default=["mask", "attention", "store", "norm", "linear", "body", "head",
                                 "placement"])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-avx512", action="store_true",
                        help="numba kernels compiled without AVX-512/AMX (the code an AVX2 CPU "
                             "runs; torch's own kernels unchanged): the script runs again so")
    args = parser.parse_args()
    if args.no_avx512 and os.environ.get("NUMBA_CPU_NAME") != "haswell":
        os.execve(sys.executable, [sys.executable, *sys.argv], no_avx512_env())
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}"
          + (" numba target: no AVX-512" if args.no_avx512 else "")
          + (f" gpu={torch.cuda.get_device_name()}" if args.device == "cuda" else "")
          + f"\n# {cpu_line()}")
    dtypes = [torch.float32, torch.bfloat16]
    with torch.inference_mode():
        if "mask" in args.only:
            bench_mask(args.device, args.repeats)
        if "attention" in args.only:
            bench_attention(args.device, args.repeats, dtypes)
        if "store" in args.only:
            bench_store(args.device, args.repeats)
        if "norm" in args.only:
            bench_norm_rotary(args.device, args.repeats, dtypes)
        if "linear" in args.only and args.device == "cpu":
            bench_linear(args.repeats)
        if "body" in args.only and args.device == "cpu":
            bench_body(max(5, args.repeats // 3))
        if "head" in args.only and args.device == "cpu":
            bench_head(args.repeats)
        if "placement" in args.only and args.device == "cpu":
            bench_placement(max(5, args.repeats // 3))


if __name__ == "__main__":
    main()
