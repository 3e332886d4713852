"""The checkpoint an export directory was made from (``manifest.json`` -> ``checkpoint``).

Commands that run PyTorch (``smlp generate --backend torch``) accept an export directory OUT and
use the checkpoint its manifest records, but only if that checkpoint still exists and still has
the weights the export was made from; otherwise the error says what to pass instead.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SMLPError

MANIFEST_FILE = "manifest.json"


def is_export_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding manifest.json but no checkpoint metadata.json."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_FILE).is_file() and not (p / "metadata.json").exists()


def checkpoint_of_export(out: str | os.PathLike) -> tuple[str, str | None]:
    """(checkpoint path, recorded weights sha256) of the export ``out``.

    Raises ``SMLPError`` (one line, with what to do) when the manifest records no usable path.
    """
    out = Path(out)
    hint = ("pass the checkpoint itself (`smlp generate CKPT`), or use `--backend ort` on an export "
            "made with `smlp export --decode`")
    try:
        entry = json.loads((out / MANIFEST_FILE).read_text()).get("checkpoint") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise SMLPError(f"{out / MANIFEST_FILE}: not a JSON manifest; {hint}") from None
    path = entry.get("path") if isinstance(entry, dict) else None
    if not path:
        raise SMLPError(f"{out} is an export of an in-memory model (its manifest records no checkpoint "
                        f"path): {hint}")
    if not Path(path).is_dir():
        raise SMLPError(f"{out} is an export; the checkpoint it was made from ({path}) no longer exists: {hint}")
    return str(path), entry.get("weights_sha256")


def export_hint(out: str | os.PathLike) -> str:
    """What to pass instead of the export ``out`` where a checkpoint is needed."""
    try:
        path = json.loads((Path(out) / MANIFEST_FILE).read_text())["checkpoint"]["path"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        path = None
    return f"pass the checkpoint it was made from ({path})" if path else "pass the checkpoint it was made from"


def load_checkpoint_of_export(out: str | os.PathLike, *, allow_pickle: bool = False):
    """Load the checkpoint ``out`` was exported from, refusing one whose weights changed since."""
    from ..checkpoint import load_checkpoint

    path, sha = checkpoint_of_export(out)
    model = load_checkpoint(path, allow_pickle=allow_pickle)
    if sha is not None and model.checkpoint_info["weights_sha256"] != sha:
        raise SMLPError(f"{out} is an export of {path}, whose weights have changed since (sha256 differs "
                        "from manifest.json): pass the checkpoint explicitly to use its current weights")
    return model, path
