"""Triton kernels behind the ``torch.ops.smlp.*`` custom ops (optional extra ``triton``).

Importing this package does not import triton; each entry point imports its kernel module on first
call, so a CPU-only install without triton never touches it. The custom ops dispatch here for CUDA
tensors; with ``TRITON_INTERPRET=1`` the same launchers run on CPU tensors (that is how the tests
exercise them on machines without a GPU).

Entry points (same arguments as the ops they accelerate, plus an optional block config):
  token_moe(hidden, router_logits, w1, b1, w2, b2, routing, k, activation)  -> [N, d]
  grouped_ffn(hidden, expert_ids, gates, w1, b1, w2, b2, activation)        -> [N, d]
  spatial_moe(z2, weight, bias)                                             -> [B, T, c]
  spatial_moe_partial(z2, weight, bias, router_weight)                      -> [B, T, c]
  spatial_moe_decode(state, weight, bias, position, expert=None, gate=None) -> [B, c]
  grouped_expert_gemm(x, offsets, weight, bias, activation)                 -> [M, N]
"""
from __future__ import annotations

from typing import Any

from ..errors import SMLPError


class TritonUnavailable(SMLPError, ImportError):
    """triton is not installed (``pip install 'smlp-export[triton]'``); one-line error in the CLI."""


def available() -> bool:
    """True when triton can be imported (it is an optional extra)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _require() -> None:
    if not available():
        raise TritonUnavailable("the Triton kernels need triton: pip install 'smlp-export[triton]'")


def token_moe(*args: Any, **kwargs: Any):
    _require()
    from .grouped_moe import token_moe as fn
    return fn(*args, **kwargs)


def grouped_ffn(*args: Any, **kwargs: Any):
    _require()
    from .grouped_moe import grouped_ffn as fn
    return fn(*args, **kwargs)


def spatial_moe(*args: Any, **kwargs: Any):
    _require()
    from .causal_spatial import spatial_moe as fn
    return fn(*args, **kwargs)


def spatial_moe_partial(*args: Any, **kwargs: Any):
    _require()
    from .causal_spatial import spatial_moe_partial as fn
    return fn(*args, **kwargs)


def spatial_moe_decode(*args: Any, **kwargs: Any):
    _require()
    from .causal_spatial import spatial_moe_decode as fn
    return fn(*args, **kwargs)


def grouped_expert_gemm(*args: Any, **kwargs: Any):
    _require()
    from .grouped_gemm import grouped_expert_gemm as fn
    return fn(*args, **kwargs)


__all__ = ["available", "TritonUnavailable", "token_moe", "grouped_ffn", "spatial_moe",
           "spatial_moe_partial", "spatial_moe_decode", "grouped_expert_gemm"]
