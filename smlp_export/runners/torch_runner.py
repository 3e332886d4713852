"""PyTorch eager runner: the reference the validator compares every backend against.

Outputs carry the same names as the exported ONNX graph (``logits``, ``router.blocks.{i}.tmoe``,
``router.blocks.{i}.smoe``), so a comparison is a dict walk, not a name-mapping exercise.
"""
from __future__ import annotations

import importlib.metadata as _md
from typing import Any

import numpy as np

from .base import Runner

ROUTER_PREFIX = "router."


class TorchRunner(Runner):
    """Runs an ``SMLPForCausalLM`` eagerly in float32 (eval mode, ``torch.inference_mode``).

    model: an ``SMLPForCausalLM``, a checkpoint path/name for ``load_checkpoint``, or None for the
    embedded default model. threads: ``torch.set_num_threads`` if given (recorded either way).
    run(input_ids int64 [B, T]) -> {"logits": float32 [B, T, V], "router.blocks.i.tmoe": float32
    [B, T, E_t], "router.blocks.i.smoe": float32 [B, c, E_s] (partial routing only)}.
    """

    name = "torch"

    def __init__(self, model: Any = None, *, threads: int | None = None, allow_pickle: bool = False):
        self._source = model
        self.threads = threads
        self.allow_pickle = allow_pickle
        self.model: Any = None

    def load(self) -> None:
        import torch

        from smlp_export import load_checkpoint

        if self.threads:
            torch.set_num_threads(self.threads)
        m = self._source
        if m is None or isinstance(m, str) or hasattr(m, "__fspath__"):
            m = load_checkpoint(m, allow_pickle=self.allow_pickle)
        # The reference is always float32, whatever precision the backend computes in.
        self.model = m.float().eval()

    def run(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        if self.model is None:
            raise RuntimeError("call load() before run()")
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        routing: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            logits = self.model(ids, routing)
        out = {"logits": logits.float().numpy()}
        out.update({ROUTER_PREFIX + k: v.float().numpy() for k, v in routing.items()})
        return out

    def metadata(self) -> dict[str, Any]:
        import torch

        return {"backend": self.name, "torch": _md.version("torch"), "dtype": "float32",
                "intra_op_threads": torch.get_num_threads(),
                "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}

    def close(self) -> None:
        self.model = None
