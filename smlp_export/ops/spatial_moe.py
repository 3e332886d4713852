"""Spatial mixture-of-experts (sMoE): causal token-mixing projections over channel chunks.

Two custom ops:
- ``smlp::spatial_moe``: deterministic routing, channel chunk i -> expert i, gate 1.
- ``smlp::spatial_moe_partial``: partial prediction, a router over the first p positions of each
  channel picks one expert per (sequence, channel), gate = its softmax probability.

A spatial expert e is ``s[t] = sum_{u <= t} W_e[t, u] * z2[u] + b_e[t]``: only the lower triangle
of ``W_e[:T, :T]`` is used (entries above the diagonal are ignored), so any T <= n works and no
output depends on a later token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..permutation import permute_by_expert
from ..routing import route_channels  # noqa: F401  (re-exported: ops.route_channels)


def causal_weight(weight: torch.Tensor, T: int) -> torch.Tensor:
    """weight [..., n, n] -> lower-triangular [..., T, T]."""
    return torch.tril(weight[..., :T, :T])


def spatial_moe_reference(z2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    B, T, c = z2.shape
    E = weight.shape[0]
    cs = c // E
    # [B, T, E, cs] -> [E, T, B*cs]: each expert's chunk of every sequence as one matrix.
    zc = z2.reshape(B, T, E, cs).permute(2, 1, 0, 3).reshape(E, T, B * cs)
    s = torch.bmm(causal_weight(weight, T), zc) + bias[:, :T, None]
    return s.reshape(E, T, B, cs).permute(2, 1, 0, 3).reshape(B, T, c)


@torch.library.custom_op("smlp::spatial_moe", mutates_args=())
def spatial_moe(z2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Deterministic spatial MoE.

    Inputs: z2 [B, T, c] float; weight [E, n, n] (T <= n, only the lower triangle is used);
    bias [E, n]. c must be divisible by E: channels [i*c/E, (i+1)*c/E) go to expert i.
    Output: [B, T, c].
    """
    if z2.is_cuda:  # Triton kernel (optional extra); CPU keeps the reference below
        from .. import kernels
        return kernels.spatial_moe(z2, weight, bias)
    return spatial_moe_reference(z2, weight, bias)


@spatial_moe.register_fake
def _spatial_moe_fake(z2, weight, bias):
    return torch.empty_like(z2)


def spatial_moe_partial_reference(
    z2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, router_weight: torch.Tensor
) -> torch.Tensor:
    B, T, c = z2.shape
    E = weight.shape[0]
    expert, gate, _ = route_channels(z2, router_weight)
    cols = z2.permute(0, 2, 1).reshape(B * c, T)  # one row per (sequence, channel)
    order, _, offsets = permute_by_expert(expert, E)
    bounds = offsets.tolist()
    rows_sorted = cols.index_select(0, order)
    pieces = []
    for e in range(E):
        if bounds[e] == bounds[e + 1]:
            continue
        r = rows_sorted[bounds[e]:bounds[e + 1]]
        pieces.append(F.linear(r, causal_weight(weight[e], T), bias[e, :T]))
    y_sorted = torch.cat(pieces, 0) * gate.reshape(-1)[order].unsqueeze(-1)
    out = torch.empty_like(cols).index_copy(0, order, y_sorted)
    return out.reshape(B, c, T).permute(0, 2, 1).contiguous()


@torch.library.custom_op("smlp::spatial_moe_partial", mutates_args=())
def spatial_moe_partial(
    z2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, router_weight: torch.Tensor
) -> torch.Tensor:
    """Partial-prediction spatial MoE.

    Inputs: z2 [B, T, c] float; weight [E, n, n] (lower triangle used); bias [E, n];
    router_weight [p, E] (p = ceil(0.2 n)). Each (sequence, channel) goes to
    ``argmax softmax(z2[b, :p, ch] @ router_weight)`` (z2 zero-padded to p rows when T < p), scaled
    by that probability. Outputs at positions < p depend on tokens < p (conditioning only).
    Output: [B, T, c].
    """
    if z2.is_cuda:  # Triton kernel (optional extra); CPU keeps the reference below
        from .. import kernels
        return kernels.spatial_moe_partial(z2, weight, bias, router_weight)
    return spatial_moe_partial_reference(z2, weight, bias, router_weight)


@spatial_moe_partial.register_fake
def _spatial_moe_partial_fake(z2, weight, bias, router_weight):
    return torch.empty_like(z2)


def spatial_moe_naive(z2, weight, bias, expert=None, gate=None) -> torch.Tensor:
    """Test oracle: loop over (sequence, channel); expert/gate [B, c] (default: deterministic)."""
    B, T, c = z2.shape
    E = weight.shape[0]
    out = torch.zeros_like(z2)
    for b in range(B):
        for ch in range(c):
            e = int(expert[b, ch]) if expert is not None else ch // (c // E)
            g = gate[b, ch] if gate is not None else 1.0
            for t in range(T):
                out[b, t, ch] = g * (sum(weight[e, t, u] * z2[b, u, ch] for u in range(t + 1)) + bias[e, t])
    return out
