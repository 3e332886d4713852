"""ONNX Runtime runner over an export folder (``model.onnx``) or one ``.onnx`` file.

ONNX Runtime silently falls back to the CPU provider when CUDA is requested but unusable, so
``load`` compares ``session.get_providers()`` with what was asked and refuses a fallback: a
benchmark or parity figure labelled "CUDA" that actually ran on the CPU would be a lie.
"""
from __future__ import annotations

import importlib.metadata as _md
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .base import Runner, RunnerUnavailable

MODEL_FILE = "model.onnx"


def ort_version() -> str:
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return _md.version(dist)
        except _md.PackageNotFoundError:
            continue
    return "unknown"


def resolve_onnx(path: str | os.PathLike) -> Path:
    """An export folder -> its model.onnx; a .onnx file -> itself. Raises InputError otherwise."""
    from smlp_export.errors import InputError

    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise InputError(f"{p} does not exist (expected an export folder with {MODEL_FILE} or a .onnx file)")
    return p


class OrtRunner(Runner):
    """An ``onnxruntime.InferenceSession``.

    providers: execution providers in priority order (default: CPU only). intra_op_threads:
    fixed, default the cores this process may use; inter_op_threads 1 with sequential execution
    (the graph is a chain). Both are recorded in ``metadata()``.
    run(input_ids int64 [B, T]) -> every graph output by name; float16 outputs are returned as
    float32 (comparisons and perplexity are computed in float32; the rounding already happened).
    """

    name = "ort"

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None, inter_op_threads: int = 1,
                 graph_optimization: str = "all", session_config: dict[str, str] | None = None):
        self.path = resolve_onnx(path)
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.intra_op_threads = intra_op_threads or len(os.sched_getaffinity(0))
        self.inter_op_threads = inter_op_threads
        self.graph_optimization = graph_optimization
        # SessionOptions config entries, e.g. {"session.disable_prepacking": "1"} (validation of
        # large models: no second, prepacked copy of every weight)
        from smlp_export.quantize import ORT_EXACT_SESSION_CONFIG

        self.session_config = {**ORT_EXACT_SESSION_CONFIG, **(session_config or {})}
        self.session: Any = None
        self._output_types: dict[str, str] = {}

    @classmethod
    def check_available(cls) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise RunnerUnavailable(f"onnxruntime is not installed ({e})") from None

    def load(self) -> None:
        self.check_available()
        import onnxruntime as ort

        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise RunnerUnavailable(f"{', '.join(missing)} not in this onnxruntime build "
                                    f"(has {', '.join(ort.get_available_providers())})")
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = levels[self.graph_optimization]
        so.log_severity_level = 3  # the CUDA-fallback warning is checked below instead
        for k, v in sorted(self.session_config.items()):
            so.add_session_config_entry(k, v)
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            from smlp_export.errors import SMLPError

            raise SMLPError(f"onnxruntime cannot load {self.path}: {str(e).splitlines()[0]}") from None
        got = self.session.get_providers()
        if self.providers[0] not in got:
            self.session = None
            raise RunnerUnavailable(f"onnxruntime fell back from {self.providers[0]} to {', '.join(got)}")
        self._output_types = {o.name: o.type for o in self.session.get_outputs()}

    def run(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        if self.session is None:
            raise RuntimeError("call load() before run()")
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        names = list(self._output_types)
        outs = self.session.run(names, {self.session.get_inputs()[0].name: ids})
        return {n: (o.astype(np.float32) if o.dtype == np.float16 else o) for n, o in zip(names, outs)}

    def metadata(self) -> dict[str, Any]:
        return {"backend": self.name, "onnxruntime": ort_version(), "model": str(self.path),
                "providers_requested": self.providers,
                "providers": self.session.get_providers() if self.session is not None else None,
                "intra_op_threads": self.intra_op_threads, "inter_op_threads": self.inter_op_threads,
                "execution_mode": "sequential", "graph_optimization": self.graph_optimization,
                "session_config": self.session_config,
                "output_types": self._output_types}

    def close(self) -> None:
        self.session = None
