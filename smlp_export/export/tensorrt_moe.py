"""The ``tensorrt`` target's token MoE: standard-op routing + permutation around two grouped GEMMs.

``lower_token_moe(model, elem=..., opset=...)`` rewrites, in the top-level graph, every
``smlp::SMLPTokenMoE`` node the dynamo exporter wrote (hidden [N, d], router_logits [N, E],
w1 [E, f, d], b1 [E, f], w2 [E, d, f], b2 [E, d]; fields routing, k, activation) into
``moe_graph.token_moe`` (the graph every target uses: ``TopK`` routing, the counting-sort
permutation of ``moe_graph.permute_by_expert``, un-permute, gate, sum over k) whose grouped
expert stage is two ``smlp::SMLPGroupedExpertGemm`` plugin nodes over the rows grouped by
expert: the up-projection with the expert activation fused, then the down-projection
(``identity``). No sort of all N k rows anywhere: TensorRT's TopK is limited to K <= 3840.

Each grouped-GEMM node carries ``plugin_namespace`` / ``plugin_version``, the contract's
``activation`` field and ``activation_index`` (its position in ``GEMM_ACTIVATIONS``), which only
the model-local fallback reads. The fallback (``grouped_gemm_function``, one function for both
nodes of a layer) is ``moe_graph.expert_loop`` (a ``Loop`` over experts with a fixed-shape
carried result, multiplying only each expert's own rows: sparse, never all-experts-dense), then
the activation picked by ``If`` nodes on ``activation_index``. Standard ops only, so TensorRT's
parser can inline it when the plugin is not registered (see docs/export.md); string ops
(``Constant value_string``, ``ai.onnx.ml.LabelEncoder``) are what it cannot parse. (ONNX function
overloads, one body per activation, were tried: ONNX Runtime honours them, ``onnx.reference``
silently runs the wrong body, and onnx-tensorrt keys local functions by name only.)

``plugin_node_name`` is the one place that names plugin nodes (TensorRT 10.9's parser may look a
plugin up by node name; see ``plugins/``).
"""
from __future__ import annotations

import onnx
from onnx import FunctionProto, NodeProto, TensorProto, helper

from . import contract
from ..ops.grouped_gemm import GEMM_ACTIVATIONS
from .functions import PLUGIN_ATTRS, TOKEN_MOE_NODE
from .moe_graph import GraphBuilder, Permutation, activation, expert_loop, token_moe

GEMM = contract.GROUPED_EXPERT_GEMM


def plugin_node_name(op_type: str, index: int) -> str:
    """Name of the ``index``-th (0-based, graph order) plugin node of ``op_type`` in a graph.

    One function so that the choice between unique names and ``node.name == op_type`` (what
    TensorRT 10.9's ONNX parser may need to find the plugin) is a one-line change."""
    return f"{op_type}_{index}"


def name_plugin_nodes(model: onnx.ModelProto) -> None:
    """Name every ``smlp``-domain node of the top-level graph with ``plugin_node_name``."""
    seen: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain == contract.DOMAIN:
            i = seen.get(n.op_type, 0)
            seen[n.op_type] = i + 1
            n.name = plugin_node_name(n.op_type, i)


def _attrs(n: NodeProto) -> dict:
    out = {}
    for a in n.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _gemm_node(b: GraphBuilder, x: str, offsets: str, w: str, bias: str, act: str) -> str:
    return b.op(GEMM.op_type, x, offsets, w, bias, domain=GEMM.domain, activation=act,
                activation_index=GEMM_ACTIVATIONS.index(act), plugin_namespace=GEMM.namespace,
                plugin_version=GEMM.version)


def token_moe_nodes(n: NodeProto, prefix: str, elem: int = TensorProto.FLOAT) -> list[NodeProto]:
    """The standard-op + grouped-GEMM replacement of one SMLPTokenMoE node (same outputs)."""
    a = _attrs(n)
    act = a["activation"]
    hidden, logits, w1, b1, w2, b2 = n.input
    b = GraphBuilder(prefix=prefix)

    def experts(b: GraphBuilder, x_sorted: str, perm: Permutation) -> str:
        h = _gemm_node(b, x_sorted, perm.offsets, w1, b1, act)  # [M, f]
        return _gemm_node(b, h, perm.offsets, w2, b2, "identity")  # [M, d]

    try:
        out = token_moe(b, hidden, logits, b.dim(w1, 0), routing=a["routing"], k=int(a["k"]), elem=elem,
                        experts=experts)
    except ValueError as e:
        raise ValueError(f"{n.name or n.output[0]}: {e}") from None
    b.output(out, n.output[0])
    return b.nodes


def _activation_by_index(b: GraphBuilder, z: str, elem: int) -> str:
    """``act(z)`` with ``act = GEMM_ACTIVATIONS[activation_index]``, the function's int attribute.

    A chain of ``If`` nodes on ``Constant(value_int = activation_index)`` picks the branch (the
    parser of TensorRT imports ``If`` with a runtime condition; ONNX Runtime runs one branch). An
    index out of range gives NaN everywhere (loud, never a plausible wrong answer); ``smlp
    validate`` names the bad field."""
    ref = onnx.AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = "value_int", "activation_index", onnx.AttributeProto.INT
    code = f"{b.prefix}act_index"
    const = helper.make_node("Constant", [], [code])
    const.attribute.append(ref)
    b.nodes.append(const)

    def branch(act: str | None, tag: str):
        sub = GraphBuilder(prefix=f"{b.prefix}{tag}_")
        if act is None:  # unknown activation index
            y = sub.op("Mul", z, sub.fconst(float("nan"), z))
        elif act == "identity":
            y = sub.op("Identity", z)
        else:
            y = activation(sub, act, z)
        return sub, y

    sub, result = branch(None, "unknown")
    for i in reversed(range(len(GEMM_ACTIVATIONS))):
        act = GEMM_ACTIVATIONS[i]
        then, y = branch(act, act)
        out_info = [helper.make_tensor_value_info(f"{b.prefix}{act}_out", elem, None)]
        then.output(y, out_info[0].name)
        sub.output(result, f"{b.prefix}{act}_else_out")
        else_g = helper.make_graph(sub.nodes, f"{b.prefix}{act}_else", [],
                                   [helper.make_tensor_value_info(f"{b.prefix}{act}_else_out", elem, None)])
        then_g = helper.make_graph(then.nodes, f"{b.prefix}{act}_then", [], out_info)
        sub = GraphBuilder(prefix=f"{b.prefix}c{i}_")
        cond = sub.op("Equal", code, sub.scalar(i))
        result = sub.op("If", cond, then_branch=then_g, else_branch=else_g)
    b.nodes += sub.nodes
    return result


def grouped_gemm_function(*, elem: int, opset: int) -> FunctionProto:
    """Fallback body of SMLPGroupedExpertGemm (any activation the node names).

    x [M, K], offsets [E + 1] int32, weight [E, N, K], bias [E, N] -> [M, N]: ``expert_loop``
    over the experts (iteration e multiplies rows ``offsets[e]:offsets[e+1]`` only; an expert with
    no rows does a 0-row Gemm), then the activation ``activation_index`` names (elementwise, so
    applying it after the loop is the same math)."""
    b = GraphBuilder(prefix="gg_")
    x, offsets, weight, bias = GEMM.inputs

    def gemm(sub: GraphBuilder, rows: str, e: str) -> str:
        return sub.op("Gemm", rows, sub.op("Gather", weight, e), sub.op("Gather", bias, e), transB=1)  # [n_e, N]

    z = expert_loop(b, x, offsets, b.dim(weight, 0), elem=elem, width=b.dim(weight, 1), body=gemm)
    b.output(_activation_by_index(b, z, elem), GEMM.outputs[0])
    return helper.make_function(GEMM.domain, GEMM.op_type, list(GEMM.inputs), list(GEMM.outputs), b.nodes,
                                opset_imports=[helper.make_opsetid("", opset)],
                                attributes=[*GEMM.attributes, *GEMM.fallback_attributes, *PLUGIN_ATTRS])


def lower_token_moe(model: onnx.ModelProto, *, elem: int, opset: int) -> int:
    """Rewrite every top-level SMLPTokenMoE node (see the module docstring) and add the
    grouped-GEMM fallback functions it needs. Returns how many layers were rewritten."""
    nodes: list[NodeProto] = []
    count = 0
    for n in model.graph.node:
        if (n.domain, n.op_type) != (TOKEN_MOE_NODE.domain, TOKEN_MOE_NODE.op_type):
            nodes.append(n)
            continue
        nodes += token_moe_nodes(n, prefix=f"tmoe{count}_", elem=elem)
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if count and not any((f.domain, f.name) == (GEMM.domain, GEMM.op_type) for f in model.functions):
        model.functions.append(grouped_gemm_function(elem=elem, opset=opset))
    return count


def finish_tensorrt(model: onnx.ModelProto, *, elem: int, opset: int) -> None:
    """The tensorrt target's graph pass (model.onnx and decode.onnx): lower token MoE, name the
    plugin nodes. The spatial MoE nodes stay one plugin node each."""
    lower_token_moe(model, elem=elem, opset=opset)
    name_plugin_nodes(model)


__all__ = ["finish_tensorrt", "lower_token_moe", "token_moe_nodes", "grouped_gemm_function", "plugin_node_name", "name_plugin_nodes"]
