"""The state dict of ``SMLPForCausalLM(cfg)`` by arithmetic: names, shapes, order; no module built.

Checking a checkpoint's header against its config (``checkpoint.check_structure``), the memory
estimate and the streamed ``smlp init`` (``smlp_export.init_weights``) read this instead of
building a meta model, so a config that disagrees with its weights is refused, naming the tensor,
before any module exists. ``tests/test_shapes.py`` holds it equal (names, order, shapes) to the
model's own ``state_dict()`` over every kind of block and option.
"""
from __future__ import annotations

from .config import SMLPConfig

Shape = tuple[int, ...]


def _norm(prefix: str, width: int) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.weight", (width,)), (f"{prefix}.bias", (width,))]


def _linear(prefix: str, n_in: int, n_out: int, bias: bool = True) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.weight", (n_out, n_in))] + ([(f"{prefix}.bias", (n_out,))] if bias else [])


def dense_block(cfg: SMLPConfig, p: str) -> list[tuple[str, Shape]]:
    """GMLPBlock ``p``: norm, proj_in, norm_z2, spatial, proj_out (registration order)."""
    d, f, c, n = cfg.d_model, cfg.d_ffn, cfg.spatial_channels, cfg.max_seq_len
    return [*_norm(f"{p}.norm", d), *_linear(f"{p}.proj_in", d, f), *_norm(f"{p}.norm_z2", c),
            (f"{p}.spatial.weight", (n, n)), (f"{p}.spatial.bias", (n,)), *_linear(f"{p}.proj_out", c, d)]


def sparse_block(cfg: SMLPConfig, p: str) -> list[tuple[str, Shape]]:
    """SparseBlock ``p``: a module's own parameters come before its submodules' in a state dict."""
    d, f, c, n = cfg.d_model, cfg.d_ffn, cfg.spatial_channels, cfg.max_seq_len
    et, ft, es = cfg.n_token_experts, cfg.d_expert, cfg.n_spatial_experts
    tmoe = [(f"{p}.tmoe.centroids", (et, d)), (f"{p}.tmoe.w1", (et, ft, d)), (f"{p}.tmoe.b1", (et, ft)),
            (f"{p}.tmoe.w2", (et, d, ft)), (f"{p}.tmoe.b2", (et, d)), *_norm(f"{p}.tmoe.norm", d)]
    smoe = [(f"{p}.smoe.weight", (es, n, n)), (f"{p}.smoe.bias", (es, n))]
    if cfg.spatial_routing == "partial":
        smoe.append((f"{p}.smoe.router", (cfg.prefix_len, es)))
    smoe += [*_norm(f"{p}.smoe.norm", d), *_linear(f"{p}.smoe.proj_in", d, f), *_norm(f"{p}.smoe.norm_z2", c),
             *_linear(f"{p}.smoe.proj_out", c, d)]
    return [*tmoe, *_norm(f"{p}.norm1", d), *smoe, *_norm(f"{p}.norm2", d)]


def state_shapes(cfg: SMLPConfig) -> dict[str, Shape]:
    """{state-dict name: shape} of ``SMLPForCausalLM(cfg)``, in ``state_dict()`` order."""
    out: list[tuple[str, Shape]] = [("embed.weight", (cfg.vocab_size, cfg.d_model))]
    sparse = set(cfg.sparse_layer_ids())
    for i in range(cfg.n_layers):
        out += (sparse_block if i in sparse else dense_block)(cfg, f"blocks.{i}")
    out += _norm("norm_f", cfg.d_model) + _linear("lm_head", cfg.d_model, cfg.vocab_size, cfg.lm_head_bias)
    return dict(out)
