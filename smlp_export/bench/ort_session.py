"""A small ONNX Runtime runner over an ONNX file, with fixed and recorded thread settings.

Used by the benchmark for ONNX files it is given directly (``--onnx``), for baselines built by
the benchmark scripts, and for profiling. The validator's ORT runner (smlp_export.runners) is
preferred for export outputs once present; both follow ``runners.base.Runner``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from smlp_export.runners.base import Runner, RunnerUnavailable
from smlp_export.runners.ort_runner import ort_version


def check_provider(provider: str) -> None:
    """Raise RunnerUnavailable unless ``provider`` can really run here.

    ORT silently falls back to CPU when CUDA is asked for without a GPU (runtime-facts.md), so the
    CUDA / TensorRT providers also need a visible CUDA device.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RunnerUnavailable(f"onnxruntime is not installed ({e})") from None
    if provider not in ort.get_available_providers():
        raise RunnerUnavailable(f"{provider} is not in this onnxruntime build "
                                f"(has {', '.join(ort.get_available_providers())})")
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        try:
            import torch

            has_gpu = torch.cuda.is_available()
        except ImportError:
            has_gpu = Path("/dev/nvidia0").exists()
        if not has_gpu:
            raise RunnerUnavailable(f"{provider} needs a CUDA GPU; none is visible")


class OrtFileRunner(Runner):
    """ONNX Runtime session over one .onnx file.

    intra_op_threads: fixed (default: the cores this process may use) so runs are comparable;
    inter_op_threads=1 and sequential execution (the graph is a chain: parallel branches only
    add scheduling noise). run(input_ids int64 [B, T]) -> every graph output by name
    (``logits`` float32 [B, T, V] first).
    """

    name = "ort"

    def __init__(self, path: str | os.PathLike, *, provider: str = "CPUExecutionProvider",
                 intra_op_threads: int | None = None, profile_prefix: str | None = None,
                 graph_optimization: str = "all"):
        self.path = Path(path)
        self.provider = provider
        self.intra_op_threads = intra_op_threads or len(os.sched_getaffinity(0))
        self.profile_prefix = profile_prefix
        self.graph_optimization = graph_optimization
        self._sess = None

    def load(self) -> None:
        import onnxruntime as ort

        check_provider(self.provider)
        if not self.path.is_file():
            raise RunnerUnavailable(f"ONNX file {self.path} does not exist")
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.graph_optimization]
        so.log_severity_level = 3
        if self.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = self.profile_prefix
        self._sess = ort.InferenceSession(str(self.path), so, providers=[self.provider])
        if self._sess.get_providers()[0] != self.provider:
            raise RunnerUnavailable(f"onnxruntime fell back to {self._sess.get_providers()[0]} "
                                    f"instead of {self.provider}")
        self._input = self._sess.get_inputs()[0].name
        self._outputs = [o.name for o in self._sess.get_outputs()]

    def run(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        if self._sess is None:
            raise RuntimeError("call load() before run()")
        outs = self._sess.run(None, {self._input: np.ascontiguousarray(input_ids, dtype=np.int64)})
        return dict(zip(self._outputs, outs))

    def end_profiling(self) -> str:
        """Stop profiling; returns the path of ORT's chrome-trace JSON file."""
        return self._sess.end_profiling()

    def metadata(self) -> dict[str, Any]:
        return {"backend": self.name, "onnxruntime": ort_version(), "provider": self.provider,
                "providers": self._sess.get_providers() if self._sess else [self.provider],
                "intra_op_threads": self.intra_op_threads, "inter_op_threads": 1,
                "execution_mode": "sequential", "graph_optimization": self.graph_optimization,
                "model": str(self.path)}

    def close(self) -> None:
        self._sess = None
