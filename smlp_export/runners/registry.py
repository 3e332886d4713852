"""Runner registry: a checked name -> the class that runs it (imported only when asked for).

``get_runner("ort", export_dir)`` returns an unloaded runner; use it as a context manager or call
``load()``. Names are checked on registration (no silent overwrite) and on lookup (one error
listing the known names).
"""
from __future__ import annotations

import importlib
import re
from typing import Any

from .base import Runner

_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
# name -> (module, class)
_RUNNERS: dict[str, tuple[str, str]] = {}


def register_runner(name: str, module: str, cls: str) -> None:
    """Register ``module:cls`` under ``name`` (lowercase, dashes). Duplicates are refused."""
    if not _NAME.match(name):
        raise ValueError(f"runner name {name!r} must match {_NAME.pattern}")
    if name in _RUNNERS and _RUNNERS[name] != (module, cls):
        raise ValueError(f"runner {name!r} is already registered as {_RUNNERS[name]}")
    _RUNNERS[name] = (module, cls)


def runner_names() -> list[str]:
    return sorted(_RUNNERS)


def get_runner_class(name: str) -> type[Runner]:
    from smlp_export.errors import InputError

    if name not in _RUNNERS:
        raise InputError(f"unknown backend {name!r}; choose from {', '.join(runner_names())}")
    module, cls = _RUNNERS[name]
    return getattr(importlib.import_module(module), cls)


def get_runner(name: str, *args: Any, **kwargs: Any) -> Runner:
    """An unloaded runner: ``get_runner("torch", ckpt)``, ``get_runner("ort", out_dir, providers=[...])``,
    ``get_runner("reference", "model.onnx")``. Unknown name -> InputError."""
    return get_runner_class(name)(*args, **kwargs)


register_runner("torch", "smlp_export.runners.torch_runner", "TorchRunner")
register_runner("ort", "smlp_export.runners.ort_runner", "OrtRunner")
register_runner("reference", "smlp_export.runners.reference_runner", "ReferenceRunner")
# TensorRT lives with the plugins it needs (the top-level smlp_plugins package, which sits above
# smlp_export): registered by name, imported only when asked for.
register_runner("tensorrt", "smlp_plugins.trt_runner", "TensorRTRunner")
