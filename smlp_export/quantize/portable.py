"""``portable`` target: each quantized weight becomes ``DequantizeLinear(q, scale)`` (opset >= 21:
int4 / int8 ``x`` with ``block_size`` along the weight's input-feature axis, no zero point) whose
output keeps the float weight's name, so every consumer (MatMul, the token-MoE Loop body, ...) is
unchanged and any ONNX runtime runs it. ONNX INT4 raw data: element 2i in the low nibble.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..export.weights import WeightSource, _all_graphs
from .scheme import MIN_OPSET_DQ, QuantizeError, QuantScheme, pack_signed_int4, quantize
from .weights import graph_weight, value


def _qtensor(name: str, q: np.ndarray, bits: int) -> TensorProto:
    if bits == 8:
        return numpy_helper.from_array(q.astype(np.int8), name)
    t = TensorProto()
    t.name, t.data_type = name, TensorProto.INT4
    t.dims.extend(q.shape)
    t.raw_data = pack_signed_int4(q)
    return t


def quantize_portable(proto: onnx.ModelProto, source: WeightSource, scheme: QuantScheme) -> dict[str, int]:
    """Rewrite ``proto`` in place; returns {parameter: quantized bytes}."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET_DQ:
        raise QuantizeError(f"quantized portable graphs need opset >= {MIN_OPSET_DQ} (blockwise DequantizeLinear); "
                            f"this one has {opset}")
    used = {i for g in _all_graphs(proto.graph) for n in g.node for i in n.input}
    done: dict[str, int] = {}
    nodes: list[onnx.NodeProto] = []
    keep: list[TensorProto] = []
    made: list[TensorProto] = []
    for t in proto.graph.initializer:
        gw = graph_weight(t, source) if t.name in used else None
        if gw is None:
            keep.append(t)
            continue
        w = np.moveaxis(value(t, source), gw.k_axis, -1)  # input features last
        k = w.shape[-1]
        block = scheme.block_for(gw.kind) or k
        q, s = quantize(w, scheme.bits, block)
        q, s = np.moveaxis(q, -1, gw.k_axis), np.ascontiguousarray(np.moveaxis(s, -1, gw.k_axis))
        qt, st = _qtensor(f"{t.name}.q{scheme.bits}", q, scheme.bits), numpy_helper.from_array(s, f"{t.name}.scales")
        made += [qt, st]
        done[gw.param] = done.get(gw.param, 0) + len(qt.raw_data) + len(st.raw_data)
        nodes.append(helper.make_node("DequantizeLinear", [qt.name, st.name], [t.name], name=f"{t.name}.dq",
                                      axis=gw.k_axis, block_size=block))
    if not nodes:
        raise QuantizeError("the graph has no weight to quantize")
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep + made)
    rest = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes + rest)
    return done
