"""ONNX Runtime runner over an export folder (``model.onnx``) or one ``.onnx`` file.

The session comes from ``ort_session.create_session``, which refuses a silent provider fallback: a
benchmark or parity figure labelled "CUDA" that actually ran on the CPU would be a lie.
"""
from __future__ import annotations

import importlib.metadata as _md
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from smlp_export.artifacts import MODEL_FILE

from .base import Runner, RunnerUnavailable
from .ort_session import LARGE_MODEL_OPTIONS, create_session


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
    (the graph is a chain). Both are recorded in ``metadata()``. graph_optimization: none | basic |
    extended | all. profile_prefix: record ORT's profile (``end_profiling``).
    run(input_ids int64 [B, T]) -> every graph output by name; float16 outputs are returned as
    float32 (comparisons and perplexity are computed in float32; the rounding already happened).
    """

    name = "ort"

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None, inter_op_threads: int = 1,
                 graph_optimization: str = "all", session_config: dict[str, str] | None = None,
                 large_model: bool = False, profile_prefix: str | None = None):
        self.path = resolve_onnx(path)
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.intra_op_threads = intra_op_threads or len(os.sched_getaffinity(0))
        self.inter_op_threads = inter_op_threads
        self.graph_optimization = graph_optimization
        from smlp_export.quantize import ORT_EXACT_SESSION_CONFIG  # quantized portable graphs: float activations

        # further SessionOptions config entries
        self.session_config = {**ORT_EXACT_SESSION_CONFIG, **(session_config or {})}
        # external-data models: no second copy of the weights (ort_session.LARGE_MODEL_OPTIONS)
        self.large_model = large_model
        self.profile_prefix = profile_prefix  # ORT's profiler on: end_profiling() returns the trace
        self.session: Any = None
        self._output_types: dict[str, str] = {}

    @classmethod
    def check_available(cls) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise RunnerUnavailable(f"onnxruntime is not installed ({e})") from None

    def load(self) -> None:
        self.session = create_session(self.path, providers=self.providers, intra_op_threads=self.intra_op_threads,
                                      inter_op_threads=self.inter_op_threads, sequential=True,
                                      graph_optimization=self.graph_optimization, config=self.session_config,
                                      profile_prefix=self.profile_prefix,
                                      **(LARGE_MODEL_OPTIONS if self.large_model else {}))
        self._output_types = {o.name: o.type for o in self.session.get_outputs()}

    def end_profiling(self) -> str:
        """Stop profiling (``profile_prefix``); returns the path of ORT's chrome-trace JSON file."""
        return self.session.end_profiling()

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
                "session_config": self.session_config, "large_model_options": LARGE_MODEL_OPTIONS if self.large_model else None,
                "output_types": self._output_types}

    def close(self) -> None:
        self.session = None
