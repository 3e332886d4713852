"""FLOPs of one forward pass of an sMLP model, per token (docs/benchmarks.md).

Counted: ``2 x multiply-accumulates`` of every matrix product, nothing else (LayerNorms, GELU,
gates, adds, softmax, sorting and gathers are left out: they are O(d) per token against the
GEMMs' O(d f)). Per token, for a sequence of T tokens:

- dense (gMLP) block: ``proj_in`` d f, spatial projection c T_eff, ``proj_out`` c d
  (c = f / 2 spatial channels);
- sparse block: token router d E_t, the k *active* token experts k (d f_t + f_t d) (experts that
  a token is not routed to cost nothing: the export is sparse), and the sMoE with the same
  shapes as a dense block (every channel goes through exactly one spatial expert); with partial
  routing also its router, c p E_s per sequence = c p E_s / T per token;
- the vocabulary projection d V. The embedding is a gather (0 FLOPs).

The spatial product ``tril(W)[:T, :T] @ z`` has T^2 multiply-adds per channel when computed
densely, but only T (T + 1) / 2 are not multiplications by the masked zeros. ``causal=True``
(the default, "useful FLOPs") counts the causal half, T_eff = (T + 1) / 2; ``causal=False`` the
full square, T_eff = T, which is what a dense MatMul executes.
"""
from __future__ import annotations

from .config import SMLPConfig


def flops_per_token(cfg: SMLPConfig, T: int, *, causal: bool = True) -> float:
    """FLOPs (2 x MACs of every GEMM) per token of a length-``T`` sequence (1 <= T <= n)."""
    if not 1 <= T <= cfg.max_seq_len:
        raise ValueError(f"T must be in [1, {cfg.max_seq_len}], got {T}")
    d, f, c = cfg.d_model, cfg.d_ffn, cfg.spatial_channels
    t_eff = (T + 1) / 2 if causal else float(T)
    gmlp = d * f + c * t_eff + c * d
    k = cfg.top_k if cfg.token_routing == "topk" else 1
    tmoe = d * cfg.n_token_experts + k * 2 * d * cfg.d_expert
    smoe = gmlp + (c * cfg.prefix_len * cfg.n_spatial_experts / T if cfg.spatial_routing == "partial" else 0.0)
    n_sparse = len(cfg.sparse_layer_ids())
    macs = (cfg.n_layers - n_sparse) * gmlp + n_sparse * (tmoe + smoe) + d * cfg.vocab_size
    return 2.0 * macs


def flops_forward(cfg: SMLPConfig, batch: int, T: int, *, causal: bool = True) -> float:
    """FLOPs of one forward pass over ``batch`` sequences of ``T`` tokens."""
    return flops_per_token(cfg, T, causal=causal) * batch * T


__all__ = ["flops_per_token", "flops_forward"]
