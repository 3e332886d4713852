"""``onnx.reference.ReferenceEvaluator`` runner: an independent (pure NumPy) ONNX runtime.

Parity against ONNX Runtime alone could hide a bug the exporter and ORT share; the reference
evaluator is a second, unrelated implementation of the ONNX spec. It runs model-local functions
(the ``tensorrt`` target's smlp-domain nodes use their bodies) and, through ``ms_moe.MoE``, the
``ort`` target's ``com.microsoft.MoE`` nodes, and through ``ms_gelu`` its ``Gelu`` / ``FastGelu``
(``ref_pad.Pad`` fixes onnx 1.23's Pad for negative
pads). It is slow: the validator feeds it small cases only.
"""
from __future__ import annotations

import importlib.metadata as _md
import os
from typing import Any

import numpy as np

from .base import Runner, RunnerUnavailable
from .ort_runner import resolve_onnx


class ReferenceRunner(Runner):
    """run(input_ids int64 [B, T]) -> every graph output by name (float16 returned as float32)."""

    name = "reference"

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_onnx(path)
        self.evaluator: Any = None

    @classmethod
    def check_available(cls) -> None:
        try:
            import onnx.reference  # noqa: F401
        except ImportError as e:
            raise RunnerUnavailable(f"onnx.reference is not available ({e})") from None

    def load(self) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        from .ms_gelu import FastGelu, Gelu
        from .ms_moe import MoE
        from .ref_pad import Pad

        model = onnx.load(str(self.path))
        try:
            self.evaluator = ReferenceEvaluator(model, new_ops=[MoE, Gelu, FastGelu, Pad])
        except Exception as e:  # noqa: BLE001 - unsupported op / bad graph: name it in one line
            from smlp_export.errors import SMLPError

            raise SMLPError(f"onnx.reference cannot load {self.path}: {str(e).splitlines()[0]}") from None
        self._inp = model.graph.input[0].name
        self._outs = [o.name for o in model.graph.output]

    def run(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        if self.evaluator is None:
            raise RuntimeError("call load() before run()")
        # onnx.reference's Sigmoid evaluates both branches of an np.where: in fp16 the unused one
        # overflows exp() (inf, inf/inf) and warns, though the selected values are right. A NaN
        # that does reach an output is still caught by the validator's all_finite check.
        with np.errstate(over="ignore", invalid="ignore"):
            outs = self.evaluator.run(None, {self._inp: np.ascontiguousarray(input_ids, dtype=np.int64)})
        outs = [np.asarray(o) for o in outs]
        return {n: (o.astype(np.float32) if o.dtype == np.float16 else o) for n, o in zip(self._outs, outs)}

    def metadata(self) -> dict[str, Any]:
        return {"backend": self.name, "onnx": _md.version("onnx"), "model": str(self.path),
                "runtime": "onnx.reference.ReferenceEvaluator", "custom_ops": ["com.microsoft.MoE (numpy)", "Pad (negative pads)"]}

    def close(self) -> None:
        self.evaluator = None
