"""``torch.load(weights_only=True)`` with one-line errors.

torch's own message for a refused file is several lines and advises re-running with
``weights_only=False``, which executes whatever code the pickle holds. That advice must never reach
a user who is loading an untrusted file, so the error is rewritten: what was wrong, in one line.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import CheckpointError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    return re.split(r"(?<=[a-z0-9])\. ", text, maxsplit=1)[0].rstrip(".")


def describe_load_error(e: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` failed, without torch's advice."""
    text = _ANSI.sub("", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.S)
    if m:
        # e.g. "Unsupported global: GLOBAL builtins.object was not an allowed global by default. ..."
        detail = _first_sentence(m.group(1).split("\n\n")[0])
        if detail.startswith("Unsupported global"):
            return f"it holds a Python object that is not a tensor or plain container ({detail})"
        return f"not a torch.save file, or corrupt ({detail})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = _first_sentence(lines[0]) if lines else type(e).__name__
    if "weights_only" in first:  # any other message that carries the advice: drop it entirely
        return f"cannot be read as a weights-only file ({type(e).__name__})"
    return f"not a torch.save file, or corrupt ({first})"


def load_weights_only(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; any failure is one
    ``CheckpointError`` naming the file."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{path}: cannot load with weights_only=True: {describe_load_error(e)}") from None
