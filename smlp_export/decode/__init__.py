"""Incremental decoding with a spatial-state cache: PyTorch step, decode.onnx, generation runtimes.

- ``state``: ``init_states``, ``step`` (PyTorch), ``DecodeStep`` (the traced module);
- ``export``: ``export_decode_graph(model, path, target=, dtype=, opset=) -> manifest section``;
- ``runtime``: ``TorchGenerator`` / ``OrtGenerator`` (greedy / sampling, streaming, tokens/s);
- ``validate``: ``validate_decode(export_dir, ...) -> report``.
See docs/decode.md.
"""
from __future__ import annotations
