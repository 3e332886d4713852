"""Compute dtypes of an sMLP model: fp32, and fp16 / bf16 *mixed* precision (docs/export.md).

``to_compute_dtype(model, "fp16" | "bf16")`` casts a model in place to half precision except for
the two places where half precision is known to break:

- **LayerNorms** (every ``nn.LayerNorm``: pre-norms, ``norm_z2``, the sparse blocks' post-norms,
  the final norm) keep float32 weights and compute in float32: the input is cast up, normalised,
  and the result cast back (``Cast -> LayerNormalization -> Cast`` in ONNX). The mean / variance
  of a 1024-wide un-normalised residual row is a sum of squares that overflows fp16 (max 65504)
  once |x| reaches ~8 per element, and bf16's 8-bit mantissa makes the variance too coarse.
- **The token router**: the affinities ``x @ C^T`` are taken on the un-normalised residual stream
  (the sparse block's input, not a LayerNorm output), so the centroids stay float32 and the
  product runs in float32 (``TokenMoE.forward`` casts ``x`` to the centroids' dtype). The logits
  reach the MoE op rounded to the compute dtype (one element type per node contract); the router
  output the validator compares is the float32 affinity. The partial spatial router's product
  and softmax run in float32 too (``ops.spatial_moe.route_channels``; its weights stay in the
  compute dtype, the op contract having one element type).

Everything else (embedding, projections, experts, spatial weights, the residual adds) runs in the
compute dtype. ``fp32`` casts everything to float32 (a half checkpoint exported as fp32).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TORCH_TO_NAME = {v: k for k, v in COMPUTE_DTYPES.items()}


class FP32LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in float32 for any input dtype; returns the input's dtype.

    x [..., d] fp16/bf16/fp32 -> same shape and dtype. Weights are float32. State-dict keys are
    those of ``nn.LayerNorm`` (``weight``, ``bias``), so a converted model saves like any other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.to(x.dtype)


def compute_dtype_name(model: nn.Module) -> str:
    """"fp32" | "fp16" | "bf16": the dtype of the model's bulk weights (its embedding)."""
    return TORCH_TO_NAME[model.embed.weight.dtype]


def to_compute_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """Cast ``model`` (an SMLPForCausalLM) in place to ``dtype`` with the mixed-precision rules
    above; returns it. ``fp32`` undoes any earlier conversion (plain float32 everywhere)."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    model.to(COMPUTE_DTYPES[dtype])
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm):
            if dtype == "fp32":
                if type(mod) is FP32LayerNorm:
                    mod.__class__ = nn.LayerNorm
            else:
                mod.float()
                mod.__class__ = FP32LayerNorm  # same parameters, float32 forward
        else:  # parameters a module keeps in float32 (the token router's centroids: model.TokenMoE)
            for name in getattr(mod, "FP32_PARAMS", ()):
                getattr(mod, name).data = getattr(mod, name).data.float()
    return model


def validation_backend(dtype: str) -> str:
    """The runtime that checks an export of ``dtype`` after ``smlp export`` (docs/validation.md).

    ONNX Runtime's CPU provider has no bfloat16 MatMul (ORT 1.31/1.32: "Could not find an
    implementation for MatMul(13)"), so bf16 graphs are checked by ``onnx.reference`` (NumPy with
    ml_dtypes' bfloat16), everything else by ONNX Runtime."""
    return "reference" if dtype == "bf16" else "ort"


__all__ = ["COMPUTE_DTYPES", "FP32LayerNorm", "compute_dtype_name", "to_compute_dtype", "validation_backend"]
