"""PyTorch runners for the benchmark: ``torch.compile`` (inductor) and, as a fallback, eager.

The MoE layers stay opaque custom ops under torch.compile (``torch.ops.smlp.*`` are registered
with fake kernels), so inductor fuses the dense parts around them and calls the sparse reference
kernels as they are. Each new (B, T) shape compiles once (``dynamic=False`` gives the fastest code
per shape); the benchmark's warm-up runs absorb that cost.
"""
from __future__ import annotations

import importlib.metadata as _md
from typing import Any

import numpy as np

from .base import Runner, RunnerUnavailable


class TorchCompileRunner(Runner):
    """Runs an ``SMLPForCausalLM`` under ``torch.compile`` (or eagerly with ``compile=False``).

    model: an SMLPForCausalLM in eval mode, or a checkpoint path/name for ``load_checkpoint``.
    run(input_ids int64 [B, T]) -> {"logits": float32 [B, T, V]}.
    """

    name = "torch-compile"

    def __init__(self, model: Any = None, *, compile: bool = True, mode: str | None = None,
                 threads: int | None = None):
        self._model_or_path = model
        self.compile = compile
        self.mode = mode
        self.threads = threads
        self.name = "torch-compile" if compile else "torch"
        self._fn = None

    @classmethod
    def check_available(cls) -> None:
        try:
            import torch  # noqa: F401
            import torch._inductor  # noqa: F401
        except ImportError as e:  # pragma: no cover - torch is a hard dependency
            raise RunnerUnavailable(f"torch.compile needs torch with inductor: {e}") from None

    def load(self) -> None:
        import torch

        from smlp_export import load_checkpoint

        if self.threads:
            torch.set_num_threads(self.threads)
        model = self._model_or_path
        if model is None or isinstance(model, str) or hasattr(model, "__fspath__"):
            model = load_checkpoint(model)
        model.eval()
        self._model = model
        if self.compile:
            import torch._inductor.config as inductor_config

            # Compile in this process: inductor's default pool of compile-worker subprocesses keeps
            # spinning after the first call and, on a small machine, steals the CPU from the timed runs
            # (measured: 1.0-1.4 s per call instead of ~1 ms right after compiling a micro model).
            inductor_config.compile_threads = 1
            self._fn = torch.compile(model, mode=self.mode, dynamic=False)
        else:
            self._fn = model

    def run(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        if self._fn is None:
            raise RuntimeError("call load() before run()")
        with torch.inference_mode():
            logits = self._fn(torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)))
        return {"logits": logits.float().numpy()}

    def metadata(self) -> dict[str, Any]:
        import torch

        return {"backend": self.name, "torch": _md.version("torch"), "intra_op_threads": torch.get_num_threads(),
                "compile": self.compile, "compile_mode": self.mode, "dtype": "float32"}

    def close(self) -> None:
        self._fn = None
        self._model = None
