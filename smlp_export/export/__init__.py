"""ONNX export of sMLP models for three targets (``ort``, ``tensorrt``, ``portable``).

``export_model(checkpoint, out, target=..., dtype=..., opset=...)`` writes OUT/model.onnx,
manifest.json and parity.json atomically; ``build_onnx`` returns the ModelProto only;
``translation_table`` is the dynamo exporter's custom translation table (reused by the decode
graph). The node contract shared with the TensorRT plugins lives in ``contract.py``.
Heavy imports (torch, onnx) happen inside the functions.
"""
from __future__ import annotations

from typing import Any

__all__ = ["export_model", "build_onnx", "translation_table", "ExportError", "ExportResult", "TARGETS", "DTYPES"]


def __getattr__(name: str) -> Any:
    # Lazy: ``import smlp_export.export.contract`` (the TensorRT plugins do) must not pull in torch.
    if name in ("export_model", "ExportError", "ExportResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "build_onnx":
        from .graph import build_onnx

        return build_onnx
    if name in ("translation_table", "TARGETS", "DTYPES"):
        from . import translations

        return getattr(translations, name)
    raise AttributeError(name)
