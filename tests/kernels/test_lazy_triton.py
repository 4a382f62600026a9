"""A CPU-only process never imports triton: the kernel modules name it lazily (kernels.backend)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import engine, kernels
    from kernels import (AttentionMetadata, apply_linear, apply_rotary, apply_token_bitmask,
                         invariant, paged_attention, prepare_linear, rms_norm, rotate_and_store)

    torch.manual_seed(0)
    kvh, h, d, bs = 2, 4, 16, 16
    k_cache, v_cache = torch.zeros(4, bs, kvh, d), torch.zeros(4, bs, kvh, d)
    # One decode (cached 4 keys + 1 new) and one prefill of 3 tokens, as the engine lays them out.
    x = torch.randn(4, 64)
    x, residual = rms_norm(x, torch.ones(64), 1e-5)
    qkv = apply_linear(x, prepare_linear(torch.randn((h + 2 * kvh) * d, 64)))
    cos, sin = torch.ones(4, d), torch.zeros(4, d)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([4, 16, 17, 18]),
        block_tables=torch.tensor([[0], [1]], dtype=torch.int32),
        seq_lens=torch.tensor([5, 3], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1, 4], dtype=torch.int32), max_query_len=3,
        num_decodes=1)
    q = rotate_and_store(qkv, h, kvh, cos, sin, k_cache, v_cache, meta.slot_mapping)
    apply_rotary(q, q[:, :kvh], cos, sin)
    out = paged_attention(q, k_cache, v_cache, meta, d ** -0.5)
    invariant.paged_attention(q, k_cache, v_cache, meta, d ** -0.5)
    logits = torch.randn(2, 64)
    apply_token_bitmask(logits, torch.full((2, 2), -1, dtype=torch.int32))
    assert out.shape == (4, h, d) and torch.isfinite(out).all()
    assert "triton" not in sys.modules, "a CPU forward imported triton"
    print("ok")
""")


def test_cpu_forward_does_not_import_triton() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PLUMBLINE_KERNELS")}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
