"""NumPy reference of ONNX Runtime's ``com.microsoft.MoE`` for ``onnx.reference.ReferenceEvaluator``.

This lets an independent runtime check the ``ort`` export target, whose token-MoE layers are
ORT's fused contrib op. Semantics (ORT contrib-op docs + runtime-facts.md, checked against ORT by
tests/test_runners.py):

- input [N, H] (or [B, S, H]), router_probs [N, E] = *raw router logits*;
- fc1_experts_weights [E, inter, H], fc1_experts_bias [E, inter], fc2_experts_weights [E, H, inter],
  fc2_experts_bias [E, H]; fc3 (gated experts) is not used by this project and is refused;
- each token picks its k largest logits; weights = softmax over all E logits taken at those k
  experts, renormalised to sum 1 when ``normalize_routing_weights=1``;
- ORT's ``gelu`` activation is the tanh approximation (measured, see the model docs).
"""
from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

_SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)


def _activation(name: str, x: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0)
    if name == "gelu":  # tanh approximation, as ORT computes it
        return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    if name == "identity":
        return x
    raise NotImplementedError(f"com.microsoft.MoE reference: activation_type {name!r} is not supported")


def moe_reference(x: np.ndarray, router: np.ndarray, w1: np.ndarray, b1: np.ndarray | None,
                  w2: np.ndarray, b2: np.ndarray | None, *, k: int, activation: str,
                  normalize: bool) -> np.ndarray:
    """x [N, H], router [N, E] logits, w1 [E, f, H], b1 [E, f], w2 [E, H, f], b2 [E, H] -> [N, H].

    Computed in float64 (a reference should not add its own rounding), returned in x's dtype.
    """
    xd, r = x.astype(np.float64), router.astype(np.float64)
    probs = np.exp(r - r.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    # Stable sort on -probs: equal logits pick the lower expert index first (as ORT's top-k does).
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # [N, k]
    gates = np.take_along_axis(probs, top, axis=-1)
    if normalize:
        gates = gates / gates.sum(-1, keepdims=True)
    y = np.zeros_like(xd)
    for e in np.unique(top):
        rows, slot = np.nonzero(top == e)  # tokens that chose expert e, and in which slot
        h = xd[rows] @ w1[e].astype(np.float64).T
        if b1 is not None:
            h = h + b1[e]
        h = _activation(activation, h) @ w2[e].astype(np.float64).T
        if b2 is not None:
            h = h + b2[e]
        y[rows] += gates[rows, slot][:, None] * h
    return y.astype(x.dtype)


class MoE(OpRun):
    """``com.microsoft.MoE`` (version 1) for the ONNX reference evaluator."""

    op_domain = "com.microsoft"

    def _run(self, x, router_probs, fc1_w, fc1_b=None, fc2_w=None, fc2_b=None, fc3_w=None, fc3_b=None,
             *rest, activation_type=None, k=None, normalize_routing_weights=None, use_sparse_mixer=None,
             **other):
        if fc3_w is not None and np.size(fc3_w):
            raise NotImplementedError("com.microsoft.MoE reference: fc3 (gated experts) is not supported")
        if use_sparse_mixer:
            raise NotImplementedError("com.microsoft.MoE reference: use_sparse_mixer=1 is not supported")
        act = activation_type.decode() if isinstance(activation_type, bytes) else (activation_type or "relu")
        shape = x.shape
        y = moe_reference(x.reshape(-1, shape[-1]), router_probs.reshape(-1, router_probs.shape[-1]),
                          fc1_w, fc1_b, fc2_w, fc2_b, k=int(k or 1), activation=act,
                          normalize=bool(normalize_routing_weights))
        return (y.reshape(shape),)
