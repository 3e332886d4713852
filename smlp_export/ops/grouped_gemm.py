"""Grouped expert GEMM over rows already grouped by expert: the token-MoE plugin's unit of work.

Custom op ``smlp::grouped_expert_gemm`` and its plain-torch reference. The token MoE for TensorRT
is lowered as: routing (ArgMax / TopK) and the token permutation in standard ONNX ops, then two
grouped GEMMs (up-projection with the activation fused, down-projection), then gate, un-permute and
sum over k in standard ops. Each GEMM is one plugin node (``SMLPGroupedExpertGemm``) whose kernel
gives every program one (expert, output tile): each weight byte is read once per call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .token_moe import activation_fn

GEMM_ACTIVATIONS = ("identity", "gelu", "gelu_tanh", "relu", "silu")


def grouped_expert_gemm_reference(x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor, activation: str) -> torch.Tensor:
    """``out[r] = act(x[r] @ weight[e]^T + bias[e])`` for the rows r in ``offsets[e]:offsets[e+1]``.

    x [M, K]; offsets [E + 1] int (non-decreasing, offsets[0] = 0, offsets[E] = M); weight [E, N, K];
    bias [E, N]. Output [M, N], dtype of x. Experts with no rows cost nothing.
    """
    if activation not in GEMM_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {GEMM_ACTIVATIONS}")
    E = weight.shape[0]
    bounds = offsets.tolist()
    if len(bounds) != E + 1 or bounds[0] != 0 or bounds[-1] != x.shape[0] or any(
            a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"offsets must be non-decreasing from 0 to M={x.shape[0]} with E+1={E + 1} "
                         f"entries, got {bounds}")
    out = x.new_empty(x.shape[0], weight.shape[1])
    for e in range(E):
        a, b = bounds[e], bounds[e + 1]
        if a == b:
            continue
        y = F.linear(x[a:b], weight[e], bias[e])
        out[a:b] = y if activation == "identity" else activation_fn(activation, y)
    return out


@torch.library.custom_op("smlp::grouped_expert_gemm", mutates_args=())
def grouped_expert_gemm(x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        activation: str) -> torch.Tensor:
    """Grouped expert GEMM.

    Inputs:
      x       [M, K]     float (fp32/fp16/bf16): rows grouped by expert (expert e owns
                         rows offsets[e]:offsets[e+1])
      offsets [E + 1]    int32/int64: exclusive prefix sum of the rows per expert
      weight  [E, N, K]  dtype of x (torch Linear layout: out x in)
      bias    [E, N]     dtype of x
    Attribute:
      activation  "identity" | "gelu" | "gelu_tanh" | "relu" | "silu" (fused epilogue)
    Output: [M, N].
    """
    if x.is_cuda:  # Triton kernel (optional extra; the plugin's kernel); CPU keeps the reference below
        from .. import kernels
        return kernels.grouped_expert_gemm(x, offsets, weight, bias, activation)
    return grouped_expert_gemm_reference(x, offsets, weight, bias, activation)


@grouped_expert_gemm.register_fake
def _grouped_expert_gemm_fake(x, offsets, weight, bias, activation):
    return x.new_empty(x.shape[0], weight.shape[1])
