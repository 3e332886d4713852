"""Pure NumPy comparison of one case: PyTorch outputs vs a backend's (no runtimes in here).

Shapes: logits float32 [B, T, V]; token-router logits [B, T, E_t]; channel-router probabilities
[B, c, E_s]; input/target token ids int64 [B, T].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tolerances import Tolerance

MAX_FLIPS_LISTED = 200  # per layer; the counts are always exact


@dataclass
class Decisions:
    """A router's decisions for one case: chosen expert set per row, and the reference margin."""

    chosen: np.ndarray  # [R, k] sorted expert ids
    margin: np.ndarray  # [R] gap between the k-th and (k+1)-th score (reference side)


def decisions(scores: np.ndarray, k: int) -> Decisions:
    """scores [..., E] -> top-k expert sets per row and the k-th minus (k+1)-th score."""
    s = scores.reshape(-1, scores.shape[-1]).astype(np.float64)
    order = np.argsort(-s, axis=-1, kind="stable")
    chosen = np.sort(order[:, :k], axis=-1)
    ranked = np.take_along_axis(s, order, axis=-1)
    if s.shape[1] > k:
        margin = ranked[:, k - 1] - ranked[:, k]
    else:  # every expert is chosen: there is no decision to flip
        margin = np.full(s.shape[0], np.inf)
    return Decisions(chosen, margin)


@dataclass
class LayerRouting:
    """Accumulated routing agreement of one MoE layer over all cases."""

    name: str
    kind: str  # "tmoe_logits" | "smoe_probs"
    k: int
    decisions: int = 0
    agree: int = 0
    ties: int = 0  # decisions whose reference margin is below the noise
    tie_flips: int = 0
    flips: int = 0  # flips outside ties: failures
    min_margin: float = float("inf")
    max_abs_err_rel: float = 0.0  # router output error / scale: how much of the noise is used
    flip_list: list[dict[str, Any]] = field(default_factory=list)

    def add(self, case: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> None:
        # Token-router logits are compared at the scale of that layer's logits; probabilities at 1.
        scale = 1.0 if self.kind == "smoe_probs" else float(np.abs(ref).max())
        noise = tol.noise(scale)
        err = float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0
        self.max_abs_err_rel = max(self.max_abs_err_rel, err / scale if scale else err)
        d_ref, d_got = decisions(ref, self.k), decisions(got, self.k)
        same = (d_ref.chosen == d_got.chosen).all(-1)
        tie = d_ref.margin < noise
        self.decisions += same.size
        self.agree += int(same.sum())
        self.ties += int(tie.sum())
        self.tie_flips += int((~same & tie).sum())
        self.flips += int((~same & ~tie).sum())
        if same.size and np.isfinite(d_ref.margin).any():
            self.min_margin = min(self.min_margin, float(d_ref.margin.min()))
        rows = ref.shape[1]  # tokens per sequence (tMoE) or channels per sequence (sMoE)
        for r in np.nonzero(~same)[0]:
            if len(self.flip_list) >= MAX_FLIPS_LISTED:
                break
            where = "position" if self.kind == "tmoe_logits" else "channel"
            self.flip_list.append({
                "case": case, "batch": int(r // rows), where: int(r % rows),
                "torch": d_ref.chosen[r].tolist(), "backend": d_got.chosen[r].tolist(),
                "margin": float(d_ref.margin[r]), "noise": noise, "tie": bool(tie[r])})

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k, "decisions": self.decisions,
                "agreement": self.agree / self.decisions if self.decisions else 1.0,
                "ties": self.ties, "tie_flips": self.tie_flips, "flips_outside_ties": self.flips,
                "max_abs_err_rel": self.max_abs_err_rel,
                "min_margin": self.min_margin if np.isfinite(self.min_margin) else None,
                "flips": self.flip_list, "flips_listed": len(self.flip_list)}


def nll_sum(logits: np.ndarray, targets: np.ndarray, start: int) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats, float64) over positions >= start."""
    lg = logits[:, start:].astype(np.float64)
    tg = targets[:, start:]
    if lg.size == 0:
        return 0.0, 0
    m = lg.max(-1, keepdims=True)
    logz = m[..., 0] + np.log(np.exp(lg - m).sum(-1))
    picked = np.take_along_axis(lg, tg[..., None], axis=-1)[..., 0]
    return float((logz - picked).sum()), int(tg.size)


def compare_logits(ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    """Errors and top-1 agreement of one case's logits [B, T, V]."""
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.abs(ref).max())
    noise = tol.noise(scale)
    flat_r = ref.reshape(-1, ref.shape[-1])
    top2 = -np.sort(-flat_r.astype(np.float64), axis=-1)[:, :2]
    gap = top2[:, 0] - top2[:, 1]
    tie = gap < noise
    agree = flat_r.argmax(-1) == got.reshape(-1, got.shape[-1]).argmax(-1)
    max_err = float(diff.max())
    return {"max_abs_err": max_err, "sum_abs_err": float(diff.sum()), "n_values": int(diff.size),
            "logits_scale": scale, "max_abs_err_rel": max_err / scale if scale else max_err,
            "positions": int(tie.size), "ties": int(tie.sum()),
            "top1_agree_outside_ties": int((agree & ~tie).sum()), "top1_disagree_in_ties": int((~agree & tie).sum()),
            "finite": bool(np.isfinite(got).all())}
