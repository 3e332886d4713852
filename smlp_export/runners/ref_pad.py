"""ONNX ``Pad`` with negative pads, for ``onnx.reference.ReferenceEvaluator``.

The ONNX spec allows negative pads (they remove elements); ONNX Runtime implements that, but
onnx 1.23's reference ``Pad`` hands them to ``np.pad``, which raises "index can't contain
negative values". The partial-routing export pads the sequence to the router prefix p with
``p - T``, negative whenever T > p, so the reference runtime needs the spec behaviour: crop the
negative sides first, then pad the positive ones.
"""
from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun


class Pad(OpRun):
    """Pad-11/13/18/19/21 (``pads`` as an input; ``axes`` optional)."""

    op_domain = ""

    def _run(self, data, pads, constant_value=None, axes=None, mode=None):
        rank = data.ndim
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in np.asarray(axes).ravel()]
        pads = [int(p) for p in np.asarray(pads).ravel()]
        n = len(axes)
        if len(pads) != 2 * n:
            raise RuntimeError(f"Pad: {len(pads)} pads for {n} axes")
        crop = [slice(None)] * rank
        width = [(0, 0)] * rank
        for i, ax in enumerate(axes):
            begin, end = pads[i], pads[n + i]
            size = data.shape[ax]
            crop[ax] = slice(max(0, -begin), size - max(0, -end))
            width[ax] = (max(0, begin), max(0, end))
        data = data[tuple(crop)]
        mode = mode.decode() if isinstance(mode, bytes) else (mode or "constant")
        if mode == "constant":
            value = 0 if constant_value is None else np.asarray(constant_value).item()
            return (np.pad(data, width, mode="constant", constant_values=value).astype(data.dtype),)
        if mode not in ("reflect", "edge", "wrap"):
            raise RuntimeError(f"Pad: unknown mode {mode!r}")
        return (np.pad(data, width, mode=mode).astype(data.dtype),)
