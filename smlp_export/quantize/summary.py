"""What a graph quantizes, read from its nodes (for ``smlp inspect``): weights, bytes, bits/weight.

Counted per quantized operand: ``MatMulNBits`` B + scales (K x N weights), ``QMoE`` fc1/fc2 +
scales (E x N x K weights), ``DequantizeLinear`` of an int4 / int8 initializer + its scale.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

_FOUR_BIT = {TensorProto.INT4, TensorProto.UINT4}


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor from its dims and type (4-bit types pack two values per byte)."""
    n = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type in _FOUR_BIT:
        return (n + 1) // 2
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _attrs(n: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}


def quantized_summary(graph: onnx.GraphProto) -> dict[str, Any] | None:
    """{"weights", "bytes", "bits_per_weight", "by_op"} or None when nothing is quantized."""
    inits = {t.name: t for t in graph.initializer}
    weights = nbytes = 0
    by_op: dict[str, int] = {}

    def add(op: str, n_weights: int, names: list[str], node: bool = True) -> None:
        nonlocal weights, nbytes
        weights += n_weights
        nbytes += sum(tensor_bytes(inits[x]) for x in names if x in inits)
        by_op[op] = by_op.get(op, 0) + int(node)

    for n in graph.node:
        if n.op_type == "MatMulNBits" and n.domain == "com.microsoft":
            a = _attrs(n)
            add(n.op_type, int(a["K"]) * int(a["N"]), list(n.input[1:3]))
        elif n.op_type == "QMoE" and n.domain == "com.microsoft":
            bits = int(_attrs(n).get("expert_weight_bits", 4))
            for w, s in ((2, 3), (5, 6)):
                if n.input[w] in inits:
                    dims = list(inits[n.input[w]].dims)
                    add(n.op_type, dims[0] * dims[1] * dims[2] * 8 // bits, [n.input[w], n.input[s]], node=w == 2)
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits and \
                inits[n.input[0]].data_type in (_FOUR_BIT | {TensorProto.INT8, TensorProto.UINT8}):
            add(n.op_type, int(np.prod(inits[n.input[0]].dims, dtype=np.int64)), list(n.input[:3]))
    if not weights:
        return None
    return {"weights": weights, "bytes": nbytes, "bits_per_weight": round(8 * nbytes / weights, 3), "by_op": by_op}
