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


# torch <= 2.5: "Unsupported global: GLOBAL os.system was not an allowed global by default";
# 2.13: "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
_GLOBAL = re.compile(r"unsupported (?:global:\s+)?GLOBAL\s+([\w.]+)", re.I)


def forbidden_global(e: BaseException) -> str | None:
    """The module.name of the global a weights-only load refused, if its message names one."""
    m = _GLOBAL.search(_ANSI.sub("", str(e)))
    return m.group(1).rstrip(".") if m else None


def describe_load_error(e: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` failed, without torch's advice."""
    text = _ANSI.sub("", str(e))
    g = forbidden_global(e)
    if g is not None:
        return (f"it holds a forbidden global {g}, a Python object that is not a tensor or plain container "
                "(refused; nothing in it was run)")
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.S)
    if m:
        # e.g. "Unsupported global: GLOBAL builtins.object was not an allowed global by default. ..."
        detail = _first_sentence(m.group(1).split("\n\n")[0])
        if detail.startswith("Unsupported global"):
            return f"it holds a Python object that is not a tensor or plain container ({detail})"
        return f"not a torch.save file, or corrupt ({detail})"
    # torch's advice paragraph ("Weights only load failed. ... `weights_only` set to `False` will likely
    # succeed ...") and its pointer to the docs say nothing about this file: keep what follows them
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    paras = [p for p in paras if "weights_only" not in p and not p.startswith("Check the documentation")] or paras
    lines = [ln.strip() for ln in paras[0].splitlines() if ln.strip()] if paras else []
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
