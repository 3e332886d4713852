"""The MoE permutation: routed rows grouped by expert, as a counting sort.

The one definition of the "Permute" stage (vLLM's modular MoE names the stages Router ->
Prepare/Dispatch -> Permute-Experts-Unpermute -> Finalize). Every consumer derives from it:
the torch references (``ops.token_moe``, ``ops.spatial_moe``), the Triton kernels'
``align_by_expert`` (which adds per-expert padding), and the ONNX graphs of every target, whose
builder (``export.moe_graph.permute_by_expert``) mirrors this function op for op.

A counting sort, not a comparison sort: it needs no TopK / argsort over all rows (TensorRT's
TopK stops at K = 3840), its cost is O(M E) elementwise, and it is stable by construction
(ascending row id within an expert), so it equals ``torch.argsort(ids, stable=True)``. This twin
counts in int64; the ONNX mirror counts in float32 (``moe_graph.MAX_GRAPH_ROWS``).

This module sits below ``ops`` and ``kernels`` (it imports neither), like ``routing``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ExpertPermutation(NamedTuple):
    """Rows grouped by expert. M routed rows, E experts; all int64.

    order [M]: ``order[s]`` = the row at sorted position s (rows of expert e are
        ``order[offsets[e]:offsets[e+1]]``, ascending row id within an expert);
    position [M]: ``position[r]`` = the sorted position of row r (``order``'s inverse: un-permute
        with ``y_sorted[position]``);
    offsets [E + 1]: exclusive prefix sum of the rows per expert (``offsets[0] = 0``, ``offsets[E] = M``).
    """

    order: torch.Tensor
    position: torch.Tensor
    offsets: torch.Tensor


def permute_by_expert(expert_ids: torch.Tensor, num_experts: int) -> ExpertPermutation:
    """Counting sort of the rows of ``expert_ids`` (any shape, flattened: row r = flat index r).

    Steps (the ONNX builder does the same, one node each):
    onehot [M, E] = (ids == e); counts = sum over rows; offsets = [0, cumsum(counts)];
    rank of a row inside its expert = exclusive cumsum of onehot over rows, read at its expert;
    position = offsets[expert] + rank; order = position's inverse (a scatter).
    No host synchronisation (runs on the GPU as is). Ids must lie in [0, num_experts).
    """
    flat = expert_ids.reshape(-1).to(torch.int64)
    rows = torch.arange(flat.numel(), device=flat.device)
    onehot = (flat[:, None] == torch.arange(num_experts, device=flat.device)).to(torch.int64)  # [M, E]
    offsets = F.pad(onehot.sum(0).cumsum(0), (1, 0))  # [E + 1]
    rank = ((onehot.cumsum(0) - onehot) * onehot).sum(1)  # [M]: earlier rows of the same expert
    position = offsets[flat] + rank
    order = torch.empty_like(position).scatter_(0, position, rows)
    return ExpertPermutation(order, position, offsets)


__all__ = ["ExpertPermutation", "permute_by_expert"]
