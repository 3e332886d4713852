"""A checkpoint's vital signs: config, sizes, block layout and routing, held-out quality, expert load."""
from __future__ import annotations

from typing import Any

import torch

from .model import SMLPForCausalLM


def block_table(model: SMLPForCausalLM) -> list[dict[str, Any]]:
    cfg = model.config
    rows = []
    for i in range(cfg.n_layers):
        if cfg.is_sparse(i):
            tm = (f"tMoE {cfg.n_token_experts} experts, "
                  + ("greedy top-1 + sigmoid gate (Base Layers)" if cfg.token_routing == "base"
                     else f"top-{cfg.top_k} softmax"))
            sm = (f"sMoE {cfg.n_spatial_experts} experts, "
                  + ("deterministic chunks" if cfg.spatial_routing == "deterministic"
                     else f"partial prediction (router on first {cfg.prefix_len} positions)"))
            rows.append({"index": i, "kind": "sparse", "routing": f"{tm}; {sm}"})
        else:
            rows.append({"index": i, "kind": "dense", "routing": "gMLP causal spatial gating"})
    return rows


def describe(model: SMLPForCausalLM, *, heldout: bool = False, windows: int = 64) -> dict[str, Any]:
    """JSON-able summary. ``heldout=True`` runs the model on held-out text (ppl, expert load)."""
    from . import data
    from .train import evaluate

    info = getattr(model, "checkpoint_info", {}) or {}
    meta = info.get("metadata", {})
    out: dict[str, Any] = {
        "path": info.get("path"),
        "weights_sha256": info.get("weights_sha256"),
        "config": model.config.to_dict(),
        "parameters": {"total": model.num_parameters(), "active_per_token": model.num_active_parameters()},
        "blocks": block_table(model),
        "metadata": {k: meta[k] for k in ("kind", "dtype", "steps", "wall_time_s", "heldout",
                                          "unigram_bits_per_byte", "corpus") if k in meta},
    }
    if heldout:
        with torch.no_grad():
            ev = evaluate(model, windows, data.corpus_source_of(model))
        out["heldout_eval"] = ev
    return out


def histogram_lines(load: list[float], width: int = 30) -> list[str]:
    top = max(load) or 1.0
    return [f"  e{i:<3d} {'#' * max(0, round(width * x / top)):<{width}s} {100 * x:5.1f}%" for i, x in enumerate(load)]
