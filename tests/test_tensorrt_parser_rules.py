"""Static check of the tensorrt export against the onnx-tensorrt operator-matrix constraints it
relies on (docs/operators.md of onnx-tensorrt for TensorRT 10.16, see
/work/shared/notes/runtime-facts.md): no TensorRT here, so the rules are read off the matrix and
checked node by node, top-level graph, function bodies (inlined, as the parser does when a plugin
is not registered) and Loop / If subgraphs alike. Each rule is shown to fire on a planted violation.
"""
from __future__ import annotations

from collections.abc import Iterator

import onnx
import pytest
from onnx import TensorProto, helper

from smlp_export.export import contract

from .test_export import built

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
STRING_CONSTANT = {"value_string", "value_strings", "sparse_value"}
# Producers that keep the shape of their first (data) input: what a Loop may compute its carried
# tensor with ("the shape of Loop carried dependencies must be the same across all iterations").
SHAPE_KEEPING = {"Identity", "ScatterND", "ScatterElements"}

# The constraints relied on: (rule id, operator-matrix row they come from).
RULES = {
    "cumsum-dtype": "CumSum | FP32, FP16, BF16",
    "cumsum-axis": "CumSum | `axis` must be an initializer",
    "constant-string": "Constant | `sparse_value`, `value_string`, and `value_strings` attributes are unsupported",
    "ml-domain": "ops outside ai.onnx / the smlp plugins (e.g. ai.onnx.ml.LabelEncoder) have no importer",
    "loop-carry-shape": "Loop | the shape of Loop carried dependencies must be the same across all iterations",
}


def _graphs(g: onnx.GraphProto, where: str) -> Iterator[tuple[onnx.GraphProto, str]]:
    yield g, where
    for n in g.node:
        for a in n.attribute:
            for i, sub in enumerate([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _graphs(sub, f"{where}/{n.op_type}:{n.name or n.output[0]}.{a.name}{i or ''}")


def _types(model: onnx.ModelProto) -> dict[str, int]:
    types: dict[str, int] = {}
    for g, _ in _graphs(model.graph, ""):
        for v in (*g.input, *g.output, *g.value_info):
            if v.type.tensor_type.elem_type:
                types[v.name] = v.type.tensor_type.elem_type
        types.update({t.name: t.data_type for t in g.initializer})
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
                types[n.output[0]] = n.attribute[0].t.data_type
    return types


def violations(model: onnx.ModelProto) -> list[str]:
    """One line per node that breaks a rule of ``RULES``, for the model as TensorRT parses it with
    and without the smlp plugins (functions inlined and shape-inferred for the element types)."""
    out: list[str] = []
    # Raw function bodies first: an attribute reference (ref_attr_name) is invisible once inlined.
    for f in model.functions:
        for n in f.node:
            if n.op_type == "Constant" and {a.name for a in n.attribute} & STRING_CONSTANT:
                out.append(f"constant-string: function {f.name}: {n.output[0]}")
    inlined = onnx.shape_inference.infer_shapes(onnx.inliner.inline_local_functions(model))
    types = _types(inlined)
    plugins = {(contract.DOMAIN, c.op_type) for c in contract.CONTRACTS.values()}
    for g, where in _graphs(inlined.graph, "graph"):
        constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
        for n in g.node:
            at = f"{where}: {n.op_type} -> {n.output[0]}"
            if n.domain not in ("", "ai.onnx") and (n.domain, n.op_type) not in plugins:
                out.append(f"ml-domain: {at} (domain {n.domain})")
            if n.op_type == "Constant" and {a.name for a in n.attribute} & STRING_CONSTANT:
                out.append(f"constant-string: {at}")
            if n.op_type == "CumSum":
                if types.get(n.input[0]) not in FLOAT_TYPES:
                    name = TensorProto.DataType.Name(types[n.input[0]]) if n.input[0] in types else "unknown"
                    out.append(f"cumsum-dtype: {at} reads {name}")
                if n.input[1] not in constants:
                    out.append(f"cumsum-axis: {at}")
            if n.op_type == "Loop":
                body = next(a.g for a in n.attribute if a.name == "body")
                inner = {o: m for m in body.node for o in m.output}
                for carried_in, carried_out in zip(body.input[2:], body.output[1:len(n.input) - 1]):
                    value = carried_out.name
                    while value != carried_in.name:
                        m = inner.get(value)
                        if m is None or m.op_type not in SHAPE_KEEPING:
                            out.append(f"loop-carry-shape: {at}: {carried_out.name} comes from "
                                       f"{m.op_type if m else 'outside the body'}, not from {carried_in.name} "
                                       f"through {sorted(SHAPE_KEEPING)}")
                            break
                        value = m.input[0]
    return out


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("name", ["base-gelu-e5", "topk2-partial-e3"])
def test_tensorrt_export_meets_the_parser_rules(name, dtype) -> None:
    proto = built(name, "tensorrt", dtype)
    assert violations(proto) == []
    # the rules did look at what they are about: CumSums, Loops and every function body
    inlined = onnx.inliner.inline_local_functions(proto)
    ops = {n.op_type for g, _ in _graphs(inlined.graph, "") for n in g.node}
    assert {"CumSum", "Loop", "If", "ScatterND"} <= ops


def _plant(proto: onnx.ModelProto, what: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    top = m.graph.node
    if what == "cumsum-dtype":  # the counting sort's one-hot in int32, as before issue 20
        cumsum_in = {n.input[0] for n in top if n.op_type == "CumSum"}
        cast = next(n for n in top if n.op_type == "Cast" and n.output[0] in cumsum_in)
        next(a for a in cast.attribute if a.name == "to").i = TensorProto.INT32
    elif what == "constant-string":  # the old grouped-GEMM fallback read its activation like this
        f = next(f for f in m.functions if f.name == contract.GROUPED_EXPERT_GEMM.op_type)
        ref = onnx.AttributeProto(name="value_string", ref_attr_name="activation", type=onnx.AttributeProto.STRING)
        node = helper.make_node("Constant", [], ["planted_name"])
        node.attribute.append(ref)
        f.node.insert(0, node)
    elif what == "ml-domain":
        f = next(f for f in m.functions if f.name == contract.GROUPED_EXPERT_GEMM.op_type)
        f.node.insert(0, helper.make_node("LabelEncoder", ["x"], ["planted_code"], domain="ai.onnx.ml",
                                          keys_floats=[0.0], values_int64s=[0], default_int64=-1))
        f.opset_import.append(helper.make_opsetid("ai.onnx.ml", 2))
        m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 2))
    elif what == "loop-carry-shape":  # a carried result that grows by Concat each iteration
        f = next(f for f in m.functions if f.name == contract.GROUPED_EXPERT_GEMM.op_type)
        loop = next(n for n in f.node if n.op_type == "Loop")
        body = next(a.g for a in loop.attribute if a.name == "body")
        scatter = next(n for n in body.node if n.op_type == "ScatterND")
        scatter.CopyFrom(helper.make_node("Concat", [scatter.input[0], scatter.input[2]], list(scatter.output), axis=0))
    return m


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_rule_fires_on_a_planted_violation(rule) -> None:
    proto = built("base-gelu-e5", "tensorrt", "fp32")
    if rule == "cumsum-axis":
        planted = onnx.ModelProto()
        planted.CopyFrom(proto)
        cumsum = next(n for n in planted.graph.node if n.op_type == "CumSum")
        cumsum.input[1] = next(n for n in planted.graph.node if n.op_type == "Shape").output[0]
    else:
        planted = _plant(proto, rule)
    found = violations(planted)
    assert found and all(v.startswith(f"{rule}:") for v in found), found
