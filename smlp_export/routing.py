"""Inference routing rules, shared by the custom ops' references and the Triton kernels.

This module sits below both ``smlp_export.ops`` and ``smlp_export.kernels`` (it imports neither), so
the kernels route exactly like the references without importing the ops package. The ops package
re-exports both functions (``smlp_export.ops.route_tokens`` / ``route_channels``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROUTINGS = ("base", "topk")


def route_tokens(router_logits: torch.Tensor, routing: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference routing, per token (never depends on other tokens).

    router_logits: [N, E] float. Returns (expert_ids [N, k] int64, gates [N, k] same dtype).
    - ``base`` (Base Layers, k must be 1): e = argmax, gate = sigmoid(logit_e).
    - ``topk``: the k largest logits, gates = softmax over those k.
    """
    if routing == "base":
        if k != 1:
            raise ValueError("routing 'base' is top-1")
        top, idx = router_logits.max(dim=-1, keepdim=True)
        return idx, torch.sigmoid(top)
    if routing == "topk":
        top, idx = torch.topk(router_logits, k, dim=-1)
        return idx, torch.softmax(top, dim=-1)
    raise ValueError(f"unknown routing {routing!r}")


def route_channels(z2: torch.Tensor, router_weight: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial-prediction routing. z2 [B, T, c]; router_weight [p, E].

    The router sees positions 0..p-1 of each channel (zero-padded when T < p).
    Returns (expert [B, c] int64, gate [B, c] = softmax prob of that expert, probs [B, c, E]).
    """
    p = router_weight.shape[0]
    # Pad by p, then keep the first p rows: no branch on T, so torch.export does not bake the
    # T < p (or T >= p) case of the example input into the exported graph.
    v = F.pad(z2, (0, 0, 0, p))[:, :p, :]
    # [B, c, p] @ [p, E] in at least float32 whatever the model dtype (a router: in bf16 a 1-ulp logit
    # error moves a sharp softmax by several percent); a MatMul, not einsum: ONNX Einsum has no
    # bfloat16 type (opset <= 23)
    dt = torch.promote_types(v.dtype, torch.float32)  # fp16/bf16 -> fp32; fp32/fp64 unchanged
    logits = torch.matmul(v.transpose(1, 2).to(dt), router_weight.to(dt))
    probs = torch.softmax(logits.float(), dim=-1).to(z2.dtype)
    gate, expert = probs.max(dim=-1)
    return expert, gate, probs


__all__ = ["ROUTINGS", "route_tokens", "route_channels"]
