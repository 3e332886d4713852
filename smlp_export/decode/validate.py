"""Parity of ``decode.onnx`` (ONNX Runtime, IO-bound in-place states) against PyTorch full recompute.

``validate_decode(export_dir, model=None)`` runs greedy generation from many real held-out prompts
(several prompt lengths, every prompt a batch row) twice: with the ONNX decode graph and with
PyTorch recomputing the whole prefix for every token (no cache: the semantics the decode graph
must reproduce). It reports:

- per-step logits error: the logits every greedy choice was made from, compared while both
  backends have produced the same tokens (after a divergence the sequences differ);
- token-for-token agreement per prompt; a divergence is a *tie* when PyTorch's margin between its
  token and ONNX Runtime's token is below the dtype's noise (``smlp_export.validate.tolerances``:
  the same table as full-graph validation), otherwise it fails;
- a teacher-forced sweep over whole held-out windows of max_seq_len tokens: a short prefill, then
  one decode step per position up to max_seq_len - 1 (greedy generation stops one position short
  of the window end, and its prompts start late), each step's logits against PyTorch's full
  forward at that position. Every row of every spatial weight is therefore used at least once.

The dtype (tolerance table) is read from decode.onnx's weights, not from the manifest.

Bounds come from the one per-dtype tolerance table (errors relative to the logits' scale).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SMLPError


def _reference_model(export_dir: Path, section: dict[str, Any], model):
    if model is not None:
        return model.eval()
    from ..artifacts import Manifest, is_export_dir
    from ..model import load_checkpoint

    path = Manifest.read(export_dir).checkpoint_path() if is_export_dir(export_dir) else None
    if not path:
        raise SMLPError(f"{export_dir}: manifest names no checkpoint; pass the model to validate_decode")
    return load_checkpoint(path)


def _prompt_lengths(n: int, p: int, n_lengths: int) -> list[int]:
    """Prompt lengths from max(p, 4) up to n / 2 (leaving room to generate)."""
    lo, hi = max(p, 4), max(max(p, 4), n // 2)
    return sorted({int(round(x)) for x in np.linspace(lo, hi, n_lengths)})


def validate_decode(export_dir: str | Path, model=None, *, n_prompts: int = 24, max_new_tokens: int = 32,
                    n_lengths: int = 3, quick: bool = False, providers: list[str] | None = None) -> dict[str, Any]:
    """Greedy-generation and per-step-logits parity of ``export_dir``'s decode.onnx (see module doc).

    model: the reference SMLPForCausalLM (default: the checkpoint named in manifest.json).
    n_prompts real held-out prompts, split over ``n_lengths`` prompt lengths; ``quick`` uses 6
    prompts and 12 new tokens. Returns a JSON-able report with ``passed``.
    """
    from ..data import corpus_source_of, heldout_windows
    from ..validate.tolerances import tolerance_for
    from .runtime import OrtGenerator, TorchFullGenerator

    from ..validate.integrity import graph_dtype

    export_dir = Path(export_dir)
    ort_gen = OrtGenerator(export_dir, providers=providers)
    section = ort_gen.decoder.section
    ref = TorchFullGenerator(_reference_model(export_dir, section, model))
    cfg = ref.model.config
    dtype = graph_dtype(ort_gen.decoder.path)
    tol = tolerance_for(dtype)
    if quick:
        n_prompts, max_new_tokens = min(n_prompts, 6), min(max_new_tokens, 12)
    lengths = _prompt_lengths(cfg.max_seq_len, cfg.prefix_len, n_lengths)
    per_len = max(1, -(-n_prompts // len(lengths)))
    source = corpus_source_of(ref.model) if hasattr(ref.model, "checkpoint_info") else None  # None: stdlib
    rows: list[dict[str, Any]] = []
    max_err, scale_all = 0.0, 0.0
    for li, T in enumerate(lengths):
        prompts = heldout_windows(per_len, T, source=source, offset=li * per_len, vocab_size=cfg.vocab_size).numpy()
        new = min(max_new_tokens, cfg.max_seq_len - T)
        kw = dict(stop_on_eos=False, record_logits=True)
        got = ort_gen.generate(prompts, new, **kw)
        want = ref.generate(prompts, new, **kw)
        for b in range(prompts.shape[0]):
            a, r = got.tokens[b], want.tokens[b]
            k = next((i for i in range(min(len(a), len(r))) if a[i] != r[i]), None)
            upto = len(r) if k is None else k + 1  # logits of step k were computed on equal prefixes
            ref_lg = np.stack([want.step_logits[i][b] for i in range(upto)]).astype(np.float64)
            got_lg = np.stack([got.step_logits[i][b] for i in range(upto)]).astype(np.float64)
            err = float(np.abs(ref_lg - got_lg).max())
            scale = float(np.abs(ref_lg).max())
            max_err, scale_all = max(max_err, err), max(scale_all, scale)
            row: dict[str, Any] = {"prompt_tokens": T, "row": b, "new_tokens": len(r), "agree": k is None,
                                   "max_abs_err": err, "max_abs_err_rel": err / scale if scale else err}
            if k is not None:
                margin = float(ref_lg[k, r[k]] - ref_lg[k, a[k]])
                noise = tol.noise(scale)
                row.update(diverged_at=k, torch_token=r[k], ort_token=a[k], torch_margin=margin,
                           noise=noise, tie=margin < noise)
            rows.append(row)
    sweep = _teacher_forced_sweep(ort_gen.decoder, ref.model, source, n_rows=2 if quick else 4)
    rel = max((r["max_abs_err_rel"] for r in rows), default=0.0)
    n_agree = sum(r["agree"] for r in rows)
    ties = [r for r in rows if not r["agree"] and r["tie"]]
    real = [r for r in rows if not r["agree"] and not r["tie"]]
    checks = [
        {"name": "step_logits_max_abs_err_rel", "value": rel, "bound": f"<= {tol.max_abs_err_rel:g}",
         "ok": rel <= tol.max_abs_err_rel},
        {"name": "greedy_divergences_outside_ties", "value": len(real), "bound": "== 0", "ok": not real},
        {"name": "teacher_forced_max_abs_err_rel", "value": sweep["max_abs_err_rel"],
         "bound": f"<= {tol.max_abs_err_rel:g}", "ok": sweep["max_abs_err_rel"] <= tol.max_abs_err_rel},
        {"name": "teacher_forced_last_position", "value": sweep["last_position"],
         "bound": f"== {cfg.max_seq_len - 1}", "ok": sweep["last_position"] == cfg.max_seq_len - 1},
    ]
    seq = None
    if section.get("sequence"):  # decode_seq.onnx: rows at different positions in one batch
        from .sequence_validate import validate_sequence

        seq = validate_sequence(export_dir, ref.model, section["sequence"], rows=3 if quick else 4, source=source,
                                tol=tol, providers=providers)
        checks += seq["checks"]
    return {
        "passed": all(c["ok"] for c in checks),
        "sequence": seq,
        "file": str(ort_gen.decoder.path.name),
        "target": section.get("target"), "dtype": dtype, "manifest_dtype": section.get("dtype"),
        "reference": "torch full recompute (every token recomputes the whole prefix)",
        "prompts": len(rows), "prompt_lengths": lengths, "max_new_tokens": max_new_tokens,
        "prompt_source": f"held-out text ({source or 'stdlib'})",
        "greedy_agree": n_agree, "greedy_diverged_in_ties": len(ties), "greedy_diverged": len(real),
        "step_logits_max_abs_err": max_err, "step_logits_max_abs_err_rel": rel, "logits_scale": scale_all,
        "tolerances": tol.to_dict(), "checks": checks,
        "state_mode": ort_gen.state_mode,
        "teacher_forced": sweep,
        "positions_checked": [0, sweep["last_position"]],
        "rows": rows,
    }


def _teacher_forced_sweep(decoder, model, source: str | None, n_rows: int) -> dict[str, Any]:
    """Held-out windows [n_rows, max_seq_len]: prefill the first max(p, 1) tokens, then step one
    token at a time through position max_seq_len - 1; every step's logits vs the PyTorch full
    forward at the same positions. Errors relative to the scale of each row's reference logits."""
    import torch

    from ..data import heldout_windows

    n = model.config.max_seq_len
    first = max(1, model.config.prefix_len)
    ids = heldout_windows(n_rows, n, source=source, offset=7, vocab_size=model.config.vocab_size).numpy()
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).float().numpy().astype(np.float64)
    stream = decoder.new_stream(n_rows)
    got = [stream.step(ids[:, :first], 0)]
    for t in range(first, n):
        got.append(stream.step(ids[:, t:t + 1], t))
    lg = np.concatenate(got, axis=1).astype(np.float64)  # [B, n, V]
    err = np.abs(lg - want).max(axis=-1)  # [B, n]
    scale = np.abs(want).max(axis=(1, 2))  # [B]
    rel = err / np.where(scale > 0, scale, 1.0)[:, None]
    worst = np.unravel_index(int(rel.argmax()), rel.shape)
    return {"rows": n_rows, "prefill_tokens": first, "last_position": n - 1 if lg.shape[1] == n else lg.shape[1] - 1,
            "max_abs_err": float(err.max()), "max_abs_err_rel": float(rel.max()),
            "worst_position": int(worst[1]), "max_abs_err_rel_last_position": float(rel[:, -1].max())}
