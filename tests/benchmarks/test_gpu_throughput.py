"""benchmarks/gpu_throughput.py off a GPU: `--device cpu --dry-run` runs its own logic (prompts,
plumbline and transformers at two stream counts, the weight-bytes bound, the markdown table) on
the tiny model; the GPU figures themselves need a GPU (benchmarks/gpu_check.sh)."""
from __future__ import annotations

from benchmarks import gpu_throughput


def test_dry_run_on_the_cpu_writes_the_table(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "gpu.md"
    assert gpu_throughput.main(["--model", str(tiny_model_dir), "--device", "cpu", "--dry-run",
                                "--out", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    assert "Device: cpu; dtype float32" in text and "| system | 1 streams | 2 streams |" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()
            if line.startswith("| plumbline") or line.startswith("| transformers")}
    assert set(rows) == {"plumbline", "transformers (static batch)"}
    for line in rows.values():
        cells = line.strip("| ").split(" | ")[1:]
        assert len(cells) == 2 and all(float(c) > 0 for c in cells), line
    assert "plumbline / transformers at 2 streams" in text
    assert "weights read per decode step" in text


def test_no_gpu_is_a_clear_refusal(monkeypatch, capsys):
    monkeypatch.setattr(gpu_throughput.torch.cuda, "is_available", lambda: False)
    assert gpu_throughput.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
