"""The in-place CPU prefill (kernels.prefill_cpu) against the torch reference of paged attention:
tiles of query rows, spans of keys, cached keys before the new rows (chunked prefill), GQA groups
and head sizes that exercise every branch of its vector code."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import paged_attention, prefill_cpu
from kernels.attention import paged_attention_ref

from benchmarks.cpu import no_avx512_env
from tests.kernels.test_attention import build, tol

# (cached, new) per prefill: one row; a tile exactly and one past it (TILE_ROWS = 16); a span
# exactly and one past it (SPAN = 64 keys); long prompts over several spans and tiles; chunks
# continuing after cached keys that end mid-block and mid-span.
PREFILLS = [(0, 2), (0, 16), (0, 17), (0, 64), (0, 65), (0, 200), (5, 1), (100, 77), (130, 17),
            (63, 2), (64, 40)]


@pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 64), (4, 128), (8, 16), (3, 40), (2, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_matches_reference(group: int, head_dim: int, dtype: torch.dtype) -> None:
    seqs = [(7, 1), (40, 1)] + PREFILLS                  # decodes first, as the engine orders
    q, kc, vc, meta, (bt, lens, starts) = build(seqs, 16, 2, group, head_dim, dtype, seed=group)
    assert prefill_cpu.can_prefill_in_place(q, kc, vc)
    expected = paged_attention_ref(q, kc, vc, bt, lens, starts, head_dim ** -0.5)
    out = paged_attention(q, kc, vc, meta, head_dim ** -0.5)
    torch.testing.assert_close(out, expected, **tol(dtype))


_EIGHT_LANES = """
import sys
import numpy as np
import torch
from kernels import prefill_cpu
d = dict(np.load(sys.argv[1]))
q, kc, vc = (torch.from_numpy(d[n]).view(torch.bfloat16) for n in ("q", "kc", "vc"))
out = prefill_cpu.prefill_in_place(q, kc, vc, d["tables"], d["lens"], d["starts"], 0.125)
np.save(sys.argv[2], out.view(torch.int16).numpy())
print(prefill_cpu.LANES)
"""


def test_eight_and_sixteen_lanes_give_the_same_bits(tmp_path: Path) -> None:
    """LANES follows what numba's target holds in one register (kernels.backend.wide_registers). A
    second process compiles the kernel for a target without AVX-512 (NUMBA_CPU_NAME/FEATURES:
    eight lanes, the code an AVX2 CPU runs) and must return this process's bits. On a CPU with
    AVX-512 this process runs sixteen lanes; on one without, both run eight."""
    seqs = [(0, 17), (100, 77), (64, 40), (0, 200)]
    q, kc, vc, meta, (bt, lens, starts) = build(seqs, 16, 3, 3, 64, torch.bfloat16, seed=5)
    arrays = {"q": q.view(torch.int16).numpy(), "kc": kc.view(torch.int16).numpy(),
              "vc": vc.view(torch.int16).numpy(), "tables": bt.numpy(), "lens": lens.numpy(),
              "starts": starts.numpy()}
    np.savez(tmp_path / "case.npz", **arrays)
    run = subprocess.run([sys.executable, "-c", _EIGHT_LANES, str(tmp_path / "case.npz"),
                          str(tmp_path / "out.npy")], env=no_avx512_env(str(tmp_path / "numba")),
                         capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "8"
    here = prefill_cpu.prefill_in_place(q, kc, vc, arrays["tables"], arrays["lens"],
                                        arrays["starts"], 0.125)
    expected = paged_attention_ref(q, kc, vc, bt, lens, starts, 0.125)
    torch.testing.assert_close(here, expected, **tol(torch.bfloat16))
    assert np.array_equal(np.load(tmp_path / "out.npy"), here.view(torch.int16).numpy())


def test_block_size_32_and_one_kv_head() -> None:
    seqs = [(0, 33), (31, 70), (96, 3)]
    q, kc, vc, meta, (bt, lens, starts) = build(seqs, 32, 1, 3, 64, torch.float32)
    expected = paged_attention_ref(q, kc, vc, bt, lens, starts, 0.125)
    torch.testing.assert_close(paged_attention(q, kc, vc, meta, 0.125), expected,
                               **tol(torch.float32))


def test_a_prefill_does_not_depend_on_the_others_or_the_threads() -> None:
    """Each prefill's tiles are its own work items, cut from its first new row: its output is
    bit for bit the same alone as beside other prefills, on one thread as on two."""
    seqs = [(0, 50), (20, 90), (0, 3)]
    q, kc, vc, meta, _ = build(seqs, 16, 3, 3, 64, torch.bfloat16)
    together = paged_attention(q, kc, vc, meta, 0.125)
    alone_q, alone_kc, alone_vc, alone_meta, _ = build(seqs[1:2], 16, 3, 3, 64, torch.bfloat16)
    # The same keys and queries for prefill 1, in a cache of its own.
    alone_q.copy_(q[50:140])
    for b_alone, b in zip(alone_meta.block_tables[0].tolist(), meta.block_tables[1].tolist()):
        alone_kc[b_alone], alone_vc[b_alone] = kc[b], vc[b]
    alone = paged_attention(alone_q, alone_kc, alone_vc, alone_meta, 0.125)
    assert torch.equal(alone, together[50:140])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        meta.prefill_arrays = None
        one_thread = paged_attention(q, kc, vc, meta, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, together)


def test_nan_stays_in_its_prefill_and_slots_past_the_keys_are_not_read() -> None:
    seqs = [(0, 20), (10, 30), (0, 5)]
    q, kc, vc, meta, (bt, lens, starts) = build(seqs, 16, 3, 3, 64, torch.float32)
    expected = paged_attention_ref(q, kc, vc, bt, lens, starts, 0.125)
    # Slots past each prefill's keys (its last block's tail) may hold anything.
    for s, seq_len in enumerate(lens.tolist()):
        last = bt[s, (seq_len - 1) // 16].long()
        kc[last, seq_len % 16 or 16:] = float("nan")
        vc[last, seq_len % 16 or 16:] = float("inf")
    clean = paged_attention(q, kc, vc, meta, 0.125)
    torch.testing.assert_close(clean, expected, **tol(torch.float32))
    kc[bt[1, 0].long(), 2, 1, 5] = float("nan")           # key 2 of prefill 1, kv head 1
    out = paged_attention(q, kc, vc, meta, 0.125)
    assert torch.isnan(out[20:50, 3:6]).all()             # every row sees key 2: heads 3..5 NaN
    assert torch.equal(out[20:50, :3], clean[20:50, :3])
    assert torch.equal(out[20:50, 6:], clean[20:50, 6:])
    assert torch.equal(out[:20], clean[:20]) and torch.equal(out[50:], clean[50:])


def test_head_dims_the_kernel_does_not_take_keep_sdpa() -> None:
    seqs = [(3, 1), (0, 9), (16, 5)]
    q, kc, vc, meta, (bt, lens, starts) = build(seqs, 16, 2, 2, 36, torch.float32)
    assert not prefill_cpu.can_prefill_in_place(q, kc, vc)
    expected = paged_attention_ref(q, kc, vc, bt, lens, starts, 36 ** -0.5)
    torch.testing.assert_close(paged_attention(q, kc, vc, meta, 36 ** -0.5), expected,
                               **tol(torch.float32))
