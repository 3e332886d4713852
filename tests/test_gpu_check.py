"""benchmarks/gpu_check.sh and benchmarks/ort_cuda.py on a machine without a GPU: the refusals and the skip.

The full dry run (``benchmarks/gpu_check.sh --dry-run``, ~2 min on 2 cores) is run by hand; see
docs/kernels.md. These are the fast paths: nothing is exported or measured.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_rejects_unknown_options():
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown option --fast" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_check_without_a_gpu_refuses_and_points_at_dry_run(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "no CUDA GPU" in res.stderr and "--dry-run" in res.stderr
    assert not (tmp_path / "gpu_check.json").exists()  # nothing half-written


def test_ort_cuda_skips_with_a_clear_line_when_the_cuda_provider_cannot_run(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        pytest.skip("the CUDA provider can run here: the skip path is not taken")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ort_cuda.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("skip: ")]
    assert len(lines) == 1 and "CUDAExecutionProvider unavailable" in lines[0]
    report = json.loads((tmp_path / "ort_cuda.json").read_text())
    assert "CUDAExecutionProvider unavailable" in report["skipped"]
    assert "parity" not in report and "latency" not in report  # nothing measured, nothing claimed
