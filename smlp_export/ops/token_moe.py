"""Token mixture-of-experts (tMoE): routing + grouped expert FFN + weighted combine.

Custom op ``smlp::token_moe`` and its plain-torch reference. The reference is *sparse*: tokens
are grouped by expert (``permutation.permute_by_expert``) and each expert multiplies only its own rows, so cost grows with the number
of routed tokens (N * k), not with the number of experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..permutation import permute_by_expert
from ..routing import ROUTINGS, route_tokens  # noqa: F401  (re-exported: ops.route_tokens)


def activation_fn(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}")


def grouped_expert_ffn(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    gates: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Sparse grouped FFN: ``out[i] = sum_j gates[i, j] * FFN_{expert_ids[i, j]}(hidden[i])``.

    hidden [N, d]; expert_ids [N, k] int; gates [N, k]; w1 [E, f, d]; b1 [E, f]; w2 [E, d, f];
    b2 [E, d]. Differentiable (used by training too).
    """
    N, d = hidden.shape
    E = w1.shape[0]
    k = expert_ids.shape[1]
    # Group the N*k (token, slot) rows by expert: each expert then owns one contiguous slice.
    order, _, offsets = permute_by_expert(expert_ids, E)
    token_of = order // k
    bounds = offsets.tolist()
    x_sorted = hidden.index_select(0, token_of)
    pieces = []
    for e in range(E):
        if bounds[e] == bounds[e + 1]:  # an expert that gets no token costs nothing
            continue
        rows = x_sorted[bounds[e]:bounds[e + 1]]
        # .to: no-op for weights in the input's dtype; validation's streamed reference keeps the
        # experts in their storage dtype and widens one expert at a time (validate/streamed.py)
        h = activation_fn(activation, F.linear(rows, w1[e].to(rows.dtype), b1[e].to(rows.dtype)))
        pieces.append(F.linear(h, w2[e].to(rows.dtype), b2[e].to(rows.dtype)))
    y_sorted = torch.cat(pieces, 0) if pieces else hidden.new_zeros(0, d)
    y_sorted = y_sorted * gates.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
    out = hidden.new_zeros(N, d)
    return out.index_add(0, token_of, y_sorted)


def token_moe_reference(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    routing: str,
    k: int,
    activation: str,
) -> torch.Tensor:
    expert_ids, gates = route_tokens(router_logits, routing, k)
    return grouped_expert_ffn(hidden, expert_ids, gates, w1, b1, w2, b2, activation)


@torch.library.custom_op("smlp::token_moe", mutates_args=())
def token_moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    routing: str,
    k: int,
    activation: str,
) -> torch.Tensor:
    """Token MoE layer (inference routing).

    Inputs:
      hidden        [N, d]     float (fp32/fp16/bf16): the expert input (already layer-normed)
      router_logits [N, E]     same dtype: affinities ``x @ C^T`` (base) or router logits (topk)
      w1 [E, f, d], b1 [E, f], w2 [E, d, f], b2 [E, d]  same dtype (torch Linear layout: out x in;
                               this is also ONNX Runtime com.microsoft.MoE's fc1/fc2 layout)
    Attributes:
      routing    "base" (greedy top-1, gate = sigmoid(logit)) | "topk" (softmax over the top k)
      k          1 or 2 (must be 1 for "base")
      activation "gelu" | "gelu_tanh" | "relu" | "silu"
    Output: [N, d], ``sum_j gate_j * FFN_{e_j}(hidden)``.
    """
    if hidden.is_cuda:  # Triton kernels (optional extra); CPU keeps the reference below
        from .. import kernels
        return kernels.token_moe(hidden, router_logits, w1, b1, w2, b2, routing, k, activation)
    return token_moe_reference(hidden, router_logits, w1, b1, w2, b2, routing, k, activation)


@token_moe.register_fake
def _token_moe_fake(hidden, router_logits, w1, b1, w2, b2, routing, k, activation):
    return torch.empty_like(hidden)


def token_moe_naive(hidden, router_logits, w1, b1, w2, b2, routing, k, activation) -> torch.Tensor:
    """Test oracle: a per-token Python loop (slow; never used by the model)."""
    ids, gates = route_tokens(router_logits, routing, k)
    out = torch.zeros_like(hidden)
    for i in range(hidden.shape[0]):
        for j in range(k):
            e = int(ids[i, j])
            h = activation_fn(activation, w1[e] @ hidden[i] + b1[e])
            out[i] += gates[i, j] * (w2[e] @ h + b2[e])
    return out
