"""Quality of a quantized export against the *float* model on held-out text.

The exactness check (export vs fake-quant twin, float tolerances) says the export computes what
the scheme says; this says what the scheme costs: perplexity delta, top-1 agreement, mean
KL(float || quantized) per token, and per token-MoE layer the tokens whose expert changed because
of quantization (reported, never failed: a flip is a legitimate effect of the rounding). The
perplexity and top-1 bounds below fail validation; docs/validation.md has the measured values.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

# bits -> bounds: (max relative perplexity increase, min top-1 agreement)
BOUNDS: dict[int, dict[str, float]] = {8: {"ppl_delta_rel": 0.005, "top1_agreement": 0.97},
                                       4: {"ppl_delta_rel": 0.03, "top1_agreement": 0.90}}
ROUTER_PREFIX = "router."


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def measure_quality(run_float: Callable[[np.ndarray], dict], run_quant: Callable[[np.ndarray], dict],
                    windows: list[np.ndarray], *, start: int, bits: int) -> dict[str, Any]:
    """windows: held-out token windows [B, T + 1] (input + next-token targets); positions < start
    (partial-routing conditioning) are not scored. Returns metrics, checks and routing flips."""
    nll_f = nll_q = kl = 0.0
    agree = n = 0
    flips: dict[str, list[int]] = {}
    for win in windows:
        ids, tgt = win[:, :-1], win[:, 1:]
        f, q = run_float(ids), run_quant(ids)
        lf, lq = _log_softmax(f["logits"][:, start:]), _log_softmax(q["logits"][:, start:])
        t = tgt[:, start:]
        nll_f -= float(np.take_along_axis(lf, t[..., None], -1).sum())
        nll_q -= float(np.take_along_axis(lq, t[..., None], -1).sum())
        kl += float((np.exp(lf) * (lf - lq)).sum())
        agree += int((lf.argmax(-1) == lq.argmax(-1)).sum())
        n += t.size
        for key in f:
            if key.startswith(ROUTER_PREFIX) and key.endswith(".tmoe") and key in q:
                ef, eq = f[key].argmax(-1), q[key].argmax(-1)
                c = flips.setdefault(key[len(ROUTER_PREFIX):], [0, 0])
                c[0] += int((ef != eq).sum())
                c[1] += int(ef.size)
    ppl_f, ppl_q = float(np.exp(nll_f / n)), float(np.exp(nll_q / n))
    metrics = {"tokens": n, "ppl_float": ppl_f, "ppl_quantized": ppl_q, "ppl_delta_rel": ppl_q / ppl_f - 1.0,
               "top1_agreement": agree / n, "kl_mean": kl / n,
               "routing_changed": {k: {"tokens": c, "of": m, "fraction": c / m} for k, (c, m) in flips.items()}}
    b = BOUNDS[bits]
    checks = [{"name": "quantized_ppl_delta_rel", "value": metrics["ppl_delta_rel"], "limit": f"<= {b['ppl_delta_rel']}",
               "ok": metrics["ppl_delta_rel"] <= b["ppl_delta_rel"]},
              {"name": "quantized_top1_agreement", "value": metrics["top1_agreement"],
               "limit": f">= {b['top1_agreement']}", "ok": metrics["top1_agreement"] >= b["top1_agreement"]}]
    return {"metrics": metrics, "checks": checks, "bounds": b}
