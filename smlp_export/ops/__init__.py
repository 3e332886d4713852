"""Custom MoE ops in the ``smlp`` torch.library namespace.

Importing this package registers ``torch.ops.smlp.token_moe``, ``torch.ops.smlp.spatial_moe`` and
``torch.ops.smlp.spatial_moe_partial``. Each has a plain-torch reference (``*_reference``, the
test oracle and the CPU implementation), a fake implementation for tracing with dynamic shapes,
and a naive loop (``*_naive``) used only by tests.
"""
from __future__ import annotations

from .grouped_gemm import (  # noqa: F401
    GEMM_ACTIVATIONS,
    grouped_expert_gemm,
    grouped_expert_gemm_reference,
)
from .spatial_moe import (  # noqa: F401
    causal_weight,
    route_channels,
    spatial_moe,
    spatial_moe_naive,
    spatial_moe_partial,
    spatial_moe_partial_reference,
    spatial_moe_reference,
)
from .token_moe import (  # noqa: F401
    activation_fn,
    grouped_expert_ffn,
    route_tokens,
    token_moe,
    token_moe_naive,
    token_moe_reference,
)
