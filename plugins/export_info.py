"""What an export says about the engine it can become (read from OUT/manifest.json).

The spatial MoE weights are [E, n, n]: the graph cannot run T > n (n = ``max_seq_len``) and the
kernels do not guard it, so an engine's sequence bound comes from the export, never from a default.
"""
from __future__ import annotations

import os
from pathlib import Path

from smlp_export.artifacts import MANIFEST_FILE, Manifest, is_export_dir


def export_max_seq(onnx_path: str | os.PathLike) -> int:
    """n (``max_seq_len``) of the export holding ``onnx_path``, from its manifest.json."""
    d = Path(onnx_path).parent
    man = d / MANIFEST_FILE
    if not is_export_dir(d):
        raise ValueError(f"no {MANIFEST_FILE} next to {onnx_path}: pass --max-seq (the model's max_seq_len)")
    manifest = Manifest.read(d, required=())  # one-line InputError (a ValueError) for a bad manifest
    n = manifest.max_seq_len if manifest.max_seq_len is not None else manifest.config.get("max_seq_len")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{man} has no positive integer max_seq_len")
    return n


def resolve_max_seq(onnx_path: str | os.PathLike, max_seq: int | None) -> int:
    """``max_seq`` if given (checked against the export's n when the manifest is there), else n."""
    if max_seq is None:
        return export_max_seq(onnx_path)
    if max_seq < 1:
        raise ValueError(f"--max-seq must be >= 1, got {max_seq}")
    if is_export_dir(Path(onnx_path).parent):
        n = export_max_seq(onnx_path)
        if max_seq > n:
            raise ValueError(f"--max-seq {max_seq} exceeds the model's max_seq_len n={n} (the spatial "
                             "weights are [E, n, n])")
    return max_seq
