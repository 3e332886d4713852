"""What an export folder really holds: the dtype the graph computes in (read from the graph, never
from the manifest's label). File checksums against the manifest: ``artifacts.Manifest.verify_files``.

The tolerance table is chosen by ``graph_dtype`` (the element type of the
graph's floating-point weights): relabelling an fp32 export as "fp16" in manifest.json cannot buy
it the looser fp16 tolerances.
"""
from __future__ import annotations

from pathlib import Path

from smlp_export.errors import InputError

# ONNX TensorProto element types of floating-point weights -> the project's dtype names.
_FLOAT_ELEMS = {1: "fp32", 10: "fp16", 16: "bf16", 11: "fp64"}


def graph_dtype(onnx_path: Path) -> str:
    """The dtype a graph computes in: the element type holding most floating-point weight values
    (initializers and Constant nodes, external data included by its declared shape)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    counts: dict[str, int] = {}

    def add(t: onnx.TensorProto) -> None:
        name = _FLOAT_ELEMS.get(t.data_type)
        if name is not None:
            n = 1
            for d in t.dims:
                n *= int(d)
            counts[name] = counts.get(name, 0) + n

    for t in m.graph.initializer:
        add(t)
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    add(a.t)
    if not counts:
        raise InputError(f"{onnx_path} has no floating-point weights: cannot tell its dtype")
    return max(counts, key=lambda k: counts[k])
