"""Expert coverage of a validation run: every expert of every MoE layer must see at least one input.

A corrupted expert that no validation input is routed to is invisible to parity, whatever the
tolerances. So after the base cases, ``plan_extra_cases`` searches for inputs that reach the experts
still uncovered and adds them as extra cases:

1. held-out text: windows of the checkpoint corpus's held-out split are run through the PyTorch
   model (cheap: one batched forward per scan) and a greedy set cover picks the fewest windows
   that reach every uncovered (layer, expert);
2. synthetic: if some expert is still unreached, seeded random token windows, the same way.

Token experts count the PyTorch side's top-k choice per token; partial-routing spatial experts the
top-1 per (sequence, channel); deterministic spatial experts always get their own channel chunk.

The ``ort`` target with ``ort_moe: auto`` runs com.microsoft.MoE inside an If branch only for calls
of at most ``AUTO_FUSED_MAX_TOKENS`` tokens (B * T), a different kernel from the long-input branch:
``plan_fused_cases`` adds short held-out windows (1..4 tokens) until every token expert is reached
through that branch too. Coverage (experts hit / total and the count per expert) goes to
parity.json's ``coverage``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .compare import decisions

SCAN_WINDOWS = 32  # windows per PyTorch scan
MAX_SCANS = 8  # per source (held-out, then synthetic)
SHORT_SCAN_WINDOWS = 256  # short windows per scan for the fused branch
SYNTHETIC_SEED = 20260


@dataclass
class LayerCoverage:
    """How many routed inputs each expert of one MoE layer got (PyTorch's decisions)."""

    name: str  # "blocks.{i}.tmoe" | "blocks.{i}.smoe"
    kind: str  # "token" | "spatial-partial" | "spatial-deterministic"
    k: int
    counts: np.ndarray  # [E] int64

    def add(self, ref: np.ndarray) -> None:
        """ref: this layer's PyTorch router output [B, T, E] or [B, c, E]."""
        chosen = decisions(ref, self.k).chosen.reshape(-1)
        self.counts += np.bincount(chosen, minlength=len(self.counts))[: len(self.counts)]

    def missing(self) -> list[int]:
        return [int(e) for e in np.nonzero(self.counts == 0)[0]]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "experts_hit": int((self.counts > 0).sum()), "experts": len(self.counts),
                "counts": self.counts.tolist()}


@dataclass
class Coverage:
    layers: dict[str, LayerCoverage] = field(default_factory=dict)

    def add(self, outputs: dict[str, np.ndarray], prefix: str) -> None:
        for name, lc in self.layers.items():
            key = prefix + name
            if lc.kind != "spatial-deterministic" and key in outputs:
                lc.add(outputs[key])

    def add_deterministic(self, batch: int, channels_per_expert: int) -> None:
        for lc in self.layers.values():
            if lc.kind == "spatial-deterministic":
                lc.counts += batch * channels_per_expert

    def missing(self) -> dict[str, list[int]]:
        return {n: lc.missing() for n, lc in self.layers.items() if lc.missing()}

    def complete(self) -> bool:
        return not self.missing()

    def to_dict(self) -> dict[str, Any]:
        hit = sum(int((lc.counts > 0).sum()) for lc in self.layers.values())
        total = sum(len(lc.counts) for lc in self.layers.values())
        return {"experts_hit": hit, "experts": total, "complete": hit == total,
                "missing": self.missing(), "layers": {n: lc.to_dict() for n, lc in self.layers.items()}}


def new_coverage(cfg, routed_layers: list[tuple[str, str, int]]) -> Coverage:
    """routed_layers: (name, kind "tmoe_logits" | "smoe_probs", k) of every router output; the
    deterministic sMoE layers (no router) are added from the config."""
    cov = Coverage()
    for name, kind, k in routed_layers:
        E = cfg.n_token_experts if kind == "tmoe_logits" else cfg.n_spatial_experts
        cov.layers[name] = LayerCoverage(name, "token" if kind == "tmoe_logits" else "spatial-partial", k,
                                         np.zeros(E, dtype=np.int64))
    if cfg.spatial_routing != "partial":
        for i in cfg.sparse_layer_ids():
            cov.layers[f"blocks.{i}.smoe"] = LayerCoverage(f"blocks.{i}.smoe", "spatial-deterministic", 1,
                                                           np.zeros(cfg.n_spatial_experts, dtype=np.int64))
    return cov


def token_layers(cov: Coverage) -> Coverage:
    """A fresh, empty coverage of the token-MoE layers only (for the fused branch)."""
    return Coverage({n: LayerCoverage(n, lc.kind, lc.k, np.zeros_like(lc.counts))
                     for n, lc in cov.layers.items() if lc.kind == "token"})


def _hits(outputs: dict[str, np.ndarray], prefix: str, cov: Coverage, need: dict[str, list[int]],
          batch: int) -> list[set[tuple[str, int]]]:
    """Per window (batch row): the still-needed (layer, expert) pairs it reaches."""
    out: list[set[tuple[str, int]]] = [set() for _ in range(batch)]
    for name, experts in need.items():
        ref = outputs[prefix + name]  # [B, R, E]
        lc = cov.layers[name]
        chosen = decisions(ref, lc.k).chosen.reshape(batch, -1)  # [B, R * k]
        for b in range(batch):
            for e in set(chosen[b].tolist()) & set(experts):
                out[b].add((name, e))
    return out


def _greedy_cover(cands: list[tuple[np.ndarray, set[tuple[str, int]]]], need: set[tuple[str, int]]
                  ) -> list[np.ndarray]:
    picked = []
    while need:
        best = max(cands, key=lambda c: len(c[1] & need), default=None)
        if best is None or not best[1] & need:
            break
        picked.append(best[0])
        need = need - best[1]
    return picked


def search(run: Callable[[np.ndarray], dict[str, np.ndarray]], prefix: str, cov: Coverage,
           windows: Callable[[int], np.ndarray], n_scans: int) -> tuple[list[np.ndarray], set[tuple[str, int]]]:
    """Scan ``windows(i)`` ([W, L] ids, i = scan number) with ``run`` (PyTorch) for the (layer,
    expert) pairs ``cov`` lacks; returns (picked windows, pairs still unreached)."""
    need = {(n, e) for n, es in cov.missing().items() for e in es}
    picked: list[np.ndarray] = []
    for i in range(n_scans):
        if not need:
            break
        w = windows(i)
        outs = run(w[:, :-1])
        hits = _hits(outs, prefix, cov, {n: [e for (m, e) in need if m == n] for n in {m for m, _ in need}}, len(w))
        got = _greedy_cover([(w[b], hits[b]) for b in range(len(w))], need)
        for row in got:
            picked.append(row)
        reached = set().union(*(hits[b] for b in range(len(w)))) if len(w) else set()
        need -= reached
    return picked, need


def synthetic_windows(vocab: int, n: int, length: int, scan: int) -> np.ndarray:
    """Seeded random token windows [n, length] (the fallback when held-out text reaches no input)."""
    rng = np.random.default_rng(SYNTHETIC_SEED + scan)
    return rng.integers(0, vocab, size=(n, length), dtype=np.int64)
