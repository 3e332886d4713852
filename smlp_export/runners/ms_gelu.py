"""``com.microsoft.Gelu`` / ``FastGelu`` for ``onnx.reference.ReferenceEvaluator`` (NumPy).

The ``ort`` export writes the dense blocks' erf-GELU as ``com.microsoft.Gelu`` and tanh-GELU
experts as ``com.microsoft.FastGelu`` (smlp_export/export/optimize.py, functions.py); these
give the reference runtime the same formulas, computed in float64 and cast back:

- Gelu(x) = 0.5 x (1 + erf(x / sqrt 2));
- FastGelu(x[, bias]) = 0.5 y (1 + tanh(sqrt(2 / pi) (y + 0.044715 y^3))), y = x + bias.
"""
from __future__ import annotations

import math

import numpy as np
from onnx.reference.op_run import OpRun


def _erf(x: np.ndarray) -> np.ndarray:
    # math.erf elementwise: NumPy has no erf and scipy is not a dependency (inputs are small)
    return np.vectorize(math.erf, otypes=[np.float64])(x)


class Gelu(OpRun):
    op_domain = "com.microsoft"

    # onnx.reference fills attributes from the default-domain Gelu schema of the same name
    # (``approximate``); com.microsoft.Gelu has none and is always the erf form.
    def _run(self, x, approximate=None):  # type: ignore[override]
        y = x.astype(np.float64)
        return ((0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))).astype(x.dtype),)


class FastGelu(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, bias=None):  # type: ignore[override]
        y = x.astype(np.float64) + (0.0 if bias is None else bias.astype(np.float64))
        inner = math.sqrt(2.0 / math.pi) * (y + 0.044715 * y ** 3)
        return ((0.5 * y * (1.0 + np.tanh(inner))).astype(x.dtype),)
