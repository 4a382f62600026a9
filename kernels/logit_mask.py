"""Token-bitmask apply: packed int32 grammar masks onto [batch, vocab] logits, in place.

Bitmask layout (llguidance, xgrammar and outlines-core share it): row r has ceil(vocab/32) or
more int32 words; bit j of word w set = token 32*w + j allowed. Disallowed tokens become -inf.

The fast CPU path is a numba kernel over the logits' bits, one pass in place, rows split
across threads: for each word that is not all ones, each of its 32 logits keeps its bits or takes
those of -inf through an and/or with an all-ones-or-zero mask made from the bit, branch-free
(AVX2 shifts and blends once LLVM vectorizes it). `masked_fill_` with an unpacked boolean mask
takes a data-dependent branch per element; the previous fast path (numpy unpackbits widened to
a 0 / -inf bias, then added) made two passes over the logits. Timings: docs/BENCHMARKS.md
(benchmarks/kernels_bench.py --only mask). Words that allow
every token cost one compare. Disallowed logits become exactly -inf whatever they held (+inf
and NaN too).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch
from numba import njit, prange

from kernels.backend import jit, numba_threads, tl, triton, use_triton

Rows = Sequence[int] | torch.Tensor | None


def _row_list(rows: Rows, num_rows: int) -> list[int]:
    if rows is None:
        return list(range(num_rows))
    return rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)


# --- torch reference (the spec) ---------------------------------------------------------------

def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor, rows: Rows = None) -> None:
    """Reference: unpack every bit, then masked_fill_ the listed rows."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1                          # [B, W, 32]
    allowed = bits.flatten(1)[:, :vocab].bool()                          # [B, vocab]
    for r in _row_list(rows, logits.shape[0]):
        logits[r].masked_fill_(~allowed[r], float("-inf"))


# --- fast CPU path ----------------------------------------------------------------------------

_NEG_INF_BITS = {torch.float32: 0xFF800000, torch.bfloat16: 0xFF80, torch.float16: 0xFC00}


@njit(nogil=True, boundscheck=False, parallel=True, cache=True)
def _mask_rows(bits, words, rows, neg_inf):  # type: ignore[no-untyped-def]
    """bits [B, vocab] uint32 / uint16 (the logits' bits), words [B, W] uint32, rows int64."""
    vocab = bits.shape[1]
    full_words = vocab // 32
    for i in prange(rows.shape[0]):                  # rows split across threads
        row, wrow = bits[rows[i]], words[rows[i]]
        for w in range(full_words):
            word = wrow[w]
            if word == np.uint32(0xFFFFFFFF):        # every token of the word allowed
                continue
            # One-dimensional views indexed by the loop counter: that is the shape LLVM turns
            # into AVX2 shifts and blends (2-d indexing kept it scalar).
            seg = row[w * 32:w * 32 + 32]
            for j in range(32):
                keep = np.uint32(0) - ((word >> np.uint32(j)) & np.uint32(1))   # 0 or all ones
                seg[j] = (seg[j] & keep) | (neg_inf & ~keep)
        for t in range(full_words * 32, vocab):
            if not (wrow[t >> 5] >> np.uint32(t & 31)) & np.uint32(1):
                row[t] = neg_inf


def warm_up() -> None:
    """Compile the fp32 bitmask kernel now rather than on a first request."""
    _mask_rows(np.zeros((1, 32), np.uint32), np.zeros((1, 1), np.uint32), np.zeros(1, np.int64),
               np.uint32(_NEG_INF_BITS[torch.float32]))


def _apply_cpu(logits: torch.Tensor, bitmask: torch.Tensor, rows: Rows) -> None:
    if logits.dtype not in _NEG_INF_BITS or logits.stride(1) != 1 or logits.requires_grad:
        apply_token_bitmask_ref(logits, bitmask, rows)
        return
    row_ids = np.asarray(_row_list(rows, logits.shape[0]), dtype=np.int64)
    if row_ids.size == 0:
        return
    limit = min(logits.shape[0], bitmask.shape[0])
    if row_ids.min() < 0 or row_ids.max() >= limit:     # the kernel does not check bounds
        raise IndexError(f"rows must lie in [0, {limit}), got {row_ids.min()}..{row_ids.max()}")
    as_int = torch.int32 if logits.element_size() == 4 else torch.int16
    bits = logits.detach().view(as_int).numpy().view(np.uint32 if as_int == torch.int32 else np.uint16)
    words = bitmask.contiguous().numpy().view(np.uint32)
    numba_threads()
    _mask_rows(bits, words, row_ids, np.uint32(_NEG_INF_BITS[logits.dtype]))


# --- Triton kernel ----------------------------------------------------------------------------

@jit
def _bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, vocab, logits_stride, bitmask_stride,
                    BLOCK: tl.constexpr):
    # grid: (num_rows, cdiv(vocab, BLOCK)); program (i, j) masks tokens [j*BLOCK, (j+1)*BLOCK)
    # of logits row rows[i].
    row = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < vocab
    words = tl.load(bitmask_ptr + row * bitmask_stride + offs // 32, mask=in_vocab, other=-1)
    allowed = ((words >> (offs % 32)) & 1) != 0
    neg_inf = tl.full([BLOCK], float("-inf"), tl.float32)
    tl.store(logits_ptr + row * logits_stride + offs, neg_inf, mask=in_vocab & ~allowed)


def _apply_triton(logits: torch.Tensor, bitmask: torch.Tensor, rows: Rows) -> None:
    num_rows, vocab = logits.shape
    assert logits.stride(1) == 1 and bitmask.stride(1) == 1, "vocab axis must be contiguous"
    assert bitmask.device == logits.device, "bitmask and logits on different devices"
    if rows is None:
        row_ids = torch.arange(num_rows, dtype=torch.int32, device=logits.device)
    elif isinstance(rows, torch.Tensor):
        row_ids = rows.to(device=logits.device, dtype=torch.int32)
    else:
        # up from pinned memory without blocking: a blocking copy would synchronise the stream
        row_ids = torch.tensor(list(rows), dtype=torch.int32, pin_memory=logits.is_cuda).to(
            logits.device, non_blocking=True)
    if row_ids.numel() == 0:
        return
    block = 1024 if logits.is_cuda else 4096        # the interpreter pays per program
    grid = (row_ids.numel(), triton.cdiv(vocab, block))
    _bitmask_kernel[grid](logits, bitmask, row_ids, vocab, logits.stride(0), bitmask.stride(0),
                          BLOCK=block)


# --- public -----------------------------------------------------------------------------------

def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Rows = None) -> None:
    """Set logits[r, t] = -inf in place where bit t of bitmask row r is clear, for r in rows."""
    assert logits.dim() == 2 and bitmask.dim() == 2, "logits [B, vocab], bitmask [B, words]"
    assert bitmask.dtype == torch.int32, f"bitmask must be int32, got {bitmask.dtype}"
    assert logits.dtype.is_floating_point, f"logits must be float, got {logits.dtype}"
    assert bitmask.shape[1] * 32 >= logits.shape[1], "bitmask has fewer bits than the vocab"
    assert rows is not None or bitmask.shape[0] >= logits.shape[0], "bitmask has too few rows"
    if use_triton(logits):
        _apply_triton(logits, bitmask, rows)
    elif sys.byteorder == "little" and not logits.is_cuda:
        _apply_cpu(logits, bitmask, rows)
    else:
        apply_token_bitmask_ref(logits, bitmask, rows)
