"""Parity of ``decode_seq.onnx`` (per-row positions) against the PyTorch full forward.

The new case over ``decode.onnx`` is a batch whose rows sit at *different* positions, as Triton's
sequence batcher forms them. ``validate_sequence`` takes ``rows`` real held-out windows of
max_seq_len tokens; row r is prefilled *alone* with its own prompt length (START = 1, a garbage
``position`` that START must override, zero states), then all unfinished rows step together, one
token each, each at its own position, with the position and states fed back from the graph's own
outputs (``new_position``, ``new_state.*``: what Triton's implicit state does); the first mixed step
takes 2 tokens per row. Rows finish at different times and the batch shrinks until every row has
reached position max_seq_len - 1. Every step's logits are compared with PyTorch's full forward of the
window at the same positions (errors relative to the row's logits scale, the shared tolerance table).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_NP_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def validate_sequence(export_dir: str | Path, model, section: dict[str, Any], *, rows: int = 4,
                      source: str | None = None, tol=None, providers: list[str] | None = None) -> dict[str, Any]:
    """Teacher-forced mixed-position parity of ``section["file"]`` in ``export_dir`` (see module doc).

    section: ``manifest["decode"]["sequence"]``; model: the reference SMLPForCausalLM; tol: a
    ``validate.tolerances.Tolerance`` (default: the table for the graph's dtype). Returns
    ``{"passed", "max_abs_err_rel", "last_positions", "min_distinct_positions", ...}``.
    """
    import torch

    from ..data import heldout_windows
    from ..quantize import ORT_EXACT_SESSION_CONFIG  # quantized portable graphs: float activations
    from ..runners.ort_session import create_session
    from ..validate.integrity import graph_dtype
    from ..validate.tolerances import tolerance_for

    path = Path(export_dir) / section["file"]
    if tol is None:
        tol = tolerance_for(graph_dtype(path))
    sess = create_session(path, providers=providers, config=ORT_EXACT_SESSION_CONFIG)
    ins, outs = section["inputs"], section["outputs"]
    out_names = [outs["logits"], outs["position"], *outs["states"]]
    cfg = model.config
    n, first = cfg.max_seq_len, max(1, cfg.prefix_len)
    ids = heldout_windows(rows, n, source=source, offset=11, vocab_size=cfg.vocab_size).numpy()
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).float().numpy().astype(np.float64)  # [R, n, V]
    scale = np.abs(want).max(axis=(1, 2))
    st_type = {i.name: i.type for i in sess.get_inputs()}[ins["states"][0]]
    if st_type not in _NP_TYPES:
        from ..errors import SMLPError

        raise SMLPError(f"{path.name}: states of type {st_type} cannot be fed from numpy here")
    sdt = np.dtype(_NP_TYPES[st_type])
    # distinct prompt lengths, all >= p, leaving room for the 2-token mixed step
    lens = [min(first + 3 * r, n - 3) for r in range(rows)]
    states = [np.zeros((rows, n, cfg.spatial_channels), dtype=sdt) for _ in ins["states"]]
    position = np.zeros((rows, 1), dtype=np.int64)
    err = np.zeros((rows, n))  # relative error per (row, position); -1 = not checked
    seen = np.zeros((rows, n), dtype=bool)

    def run(sel: np.ndarray, tok: np.ndarray, start: int, pos_in: np.ndarray) -> None:
        feeds = {ins["input_ids"]: tok, ins["position"]: pos_in,
                 ins["start"]: np.full((len(sel), 1), start, dtype=np.int32),
                 **{name: st[sel] for name, st in zip(ins["states"], states)}}
        res = sess.run(out_names, feeds)
        at = np.where(start, 0, pos_in[:, 0])
        for j, r in enumerate(sel):
            p0 = int(at[j])
            e = np.abs(res[0][j].astype(np.float64) - want[r, p0:p0 + tok.shape[1]]).max(axis=-1)
            err[r, p0:p0 + tok.shape[1]] = e / (scale[r] if scale[r] > 0 else 1.0)
            seen[r, p0:p0 + tok.shape[1]] = True
        position[sel] = res[1]
        for st, new in zip(states, res[2:]):
            st[sel] = new

    for r, L in enumerate(lens):  # each row's first request, alone; 97 is a stale position START must override
        run(np.array([r]), ids[r:r + 1, :L], 1, np.full((1, 1), 97, dtype=np.int64))
    distinct, S = [], 2
    while True:
        sel = np.array([r for r in range(rows) if position[r, 0] + S <= n])
        if len(sel) == 0:
            break
        p = position[sel, 0]
        distinct.append(len(set(p.tolist())))
        tok = np.stack([ids[r, p[j]:p[j] + S] for j, r in enumerate(sel)])
        run(sel, tok, 0, position[sel].copy())
        S = 1
    rel = float(err[seen].max())
    last = [int(np.flatnonzero(seen[r]).max()) for r in range(rows)]
    complete = bool(seen.all())
    checks = [
        {"name": "sequence_max_abs_err_rel", "value": rel, "bound": f"<= {tol.max_abs_err_rel:g}",
         "ok": rel <= tol.max_abs_err_rel},
        {"name": "sequence_every_position_checked", "value": complete, "bound": "true", "ok": complete},
        {"name": "sequence_mixed_positions", "value": max(distinct, default=0), "bound": f"== {rows}",
         "ok": max(distinct, default=0) == rows},
    ]
    return {"passed": all(c["ok"] for c in checks), "file": section["file"], "rows": rows,
            "prompt_tokens": lens, "mixed_steps": len(distinct), "max_distinct_positions": max(distinct, default=0),
            "max_abs_err_rel": rel, "last_positions": last, "checks": checks}
