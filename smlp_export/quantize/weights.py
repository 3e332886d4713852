"""The quantizable initializers of an exported graph: which parameter each comes from, along which
axis its input features run, and its float value (computed from the checkpoint one at a time).

Graph weights are the model's parameters, possibly transposed (``proj_*.weight.T``: [K, N]) and
split along the output axis (``.part0/1``); their recipes (``export/weights.py``) say so. Blocks
run along the parameter's last (input-feature) axis wherever it ended up in the graph, so a graph
weight quantizes to exactly the same numbers as its parameter in the fake-quant twin.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..export.weights import WeightSource, compute, recipe_of
from .scheme import QuantizeError, weight_kind


@dataclass(frozen=True)
class GraphWeight:
    name: str  # initializer name
    param: str  # state-dict name of the parameter it derives from
    kind: str  # "dense" | "expert"
    k_axis: int  # axis of the input features in the graph's tensor


def _k_axis_of_ops(ndim: int, ops) -> int:
    axis = ndim - 1
    for op in ops:
        if op[0] == "transpose":
            axis = list(op[1]).index(axis)
        elif op[0] == "slice" and op[1] == axis:
            raise QuantizeError("a graph weight is sliced along its input features; cannot quantize it blockwise")
        elif op[0] not in ("slice",):
            return -1  # tril etc.: not a plain copy of the parameter
    return axis


def graph_weight(t: onnx.TensorProto, source: WeightSource | None = None) -> GraphWeight | None:
    """The parameter behind initializer ``t`` if the scheme quantizes it, else None."""
    r = recipe_of(t)
    if r is not None:
        param, ops = r.source, r.ops
    else:  # small tensors hold their data; their names usually still say what they are
        m = re.fullmatch(r"(?:model\.)?(.+?)(\.T)?(\.part\d+)?", t.name)
        param = m.group(1)
        ops = (("transpose", tuple(reversed(range(len(t.dims))))),) if m.group(2) else ()
        if weight_kind(param) is None and source is not None and len(t.dims) == 2:
            found = _match_small(t, source)  # the exporter folded a transpose into "val_N"
            if found is None:
                return None
            param, ops = found, (("transpose", (1, 0)),)
    kind = weight_kind(param)
    if kind is None:
        return None
    axis = _k_axis_of_ops(len(t.dims), ops)
    if axis < 0:
        return None
    return GraphWeight(t.name, param, kind, axis)


def _match_small(t: onnx.TensorProto, source: WeightSource) -> str | None:
    """The quantizable parameter whose transpose equals the small real tensor ``t`` (by content)."""
    a = numpy_helper.to_array(t)
    for name in source.keys():
        if weight_kind(name) is None:
            continue
        p = source.get(name)
        if tuple(p.shape) == a.shape[::-1] and np.array_equal(p.float().numpy().T, a.astype(np.float32)):
            return name
    return None


def value(t: onnx.TensorProto, source: WeightSource) -> np.ndarray:
    """The float32 value of initializer ``t`` (placeholder or real)."""
    r = recipe_of(t)
    if r is not None:
        return compute(r, source).float().numpy()
    return numpy_helper.to_array(t).astype(np.float32)
