"""The ``tensorrt`` target's token MoE: standard-op routing + permutation around two grouped GEMMs.

``lower_token_moe(model, elem=..., opset=...)`` rewrites, in the top-level graph, every
``smlp::SMLPTokenMoE`` node the dynamo exporter wrote (hidden [N, d], router_logits [N, E],
w1 [E, f, d], b1 [E, f], w2 [E, d, f], b2 [E, d]; fields routing, k, activation) into

1. routing in standard ops: ``TopK(router_logits, k)`` -> expert ids [N, k] and gates
   (``Sigmoid`` of the chosen logit for Base Layers, ``Softmax`` over the k for top-k);
2. the permutation by expert as a *counting sort* in standard ops (no sort of all N k rows:
   TensorRT's TopK is limited to K <= 3840): ``onehot = Equal(ids, 0..E-1)`` [M, E] (M = N k),
   ``counts = ReduceSum(onehot)``, ``offsets = [0, CumSum(counts)]`` [E + 1] int32, each row's
   rank inside its expert = ``exclusive CumSum(onehot)`` at its expert, so its sorted position is
   ``pos = offsets[e] + rank`` (stable: ascending row id within an expert, like the PyTorch
   reference's stable argsort); ``order = ScatterElements(pos -> row)`` and the rows
   ``x_sorted = Gather(hidden, order // k)``;
3. two ``smlp::SMLPGroupedExpertGemm`` plugin nodes over the rows grouped by expert: the
   up-projection with the expert activation fused, then the down-projection (``identity``);
4. un-permute (``Gather(y_sorted, pos)``), gate multiply, sum over the k slots.

Each grouped-GEMM node carries ``plugin_namespace`` / ``plugin_version`` and the contract's
``activation`` field; its model-local fallback (``grouped_gemm_function``, one function for both
nodes of a layer) is a ``Loop`` over experts that multiplies only each expert's own rows
(``x[offsets[e]:offsets[e+1]]``: sparse, never all-experts-dense), then applies the activation
the node's field names. The two nodes share the op_type but not the activation, and a body
cannot branch on a string attribute with opset-18 default-domain ops, so the field goes through
``ai.onnx.ml.LabelEncoder`` + ``If``. (ONNX function overloads, one body per activation, were
tried: ONNX Runtime honours them, ``onnx.reference`` silently runs the wrong body.)

``plugin_node_name`` is the one place that names plugin nodes (TensorRT 10.9's parser may look a
plugin up by node name; see ``plugins/``).
"""
from __future__ import annotations

import onnx
from onnx import FunctionProto, NodeProto, TensorProto, helper

from . import contract
from ..ops.grouped_gemm import GEMM_ACTIVATIONS
from .functions import PLUGIN_ATTRS, TOKEN_MOE_NODE, _Builder, activation

GEMM = contract.GROUPED_EXPERT_GEMM
ML_DOMAIN = "ai.onnx.ml"  # LabelEncoder: the fallback body reads its string field through it


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


def _gemm_node(b: _Builder, x: str, offsets: str, w: str, bias: str, act: str) -> str:
    return b.op(GEMM.op_type, x, offsets, w, bias, domain=GEMM.domain, activation=act,
                plugin_namespace=GEMM.namespace, plugin_version=GEMM.version)


def token_moe_nodes(n: NodeProto, prefix: str) -> list[NodeProto]:
    """The standard-op + grouped-GEMM replacement of one SMLPTokenMoE node (same outputs)."""
    a = _attrs(n)
    routing, k, act = a["routing"], int(a["k"]), a["activation"]
    hidden, logits, w1, b1, w2, b2 = n.input
    b = _Builder(prefix=prefix)
    vals, ids = b.op("TopK", logits, b.ints(k), axis=-1, largest=1, sorted=1, n_out=2)  # [N, k]
    if routing == "base":  # Base Layers: greedy top-1, gate = sigmoid(affinity)
        if k != 1:
            raise ValueError(f"{n.name or n.output[0]}: routing 'base' is top-1, got k={k}")
        gates = b.op("Sigmoid", vals)
    elif routing == "topk":  # softmax over the k largest logits
        gates = b.op("Softmax", vals, axis=-1)
    else:
        raise ValueError(f"unknown routing {routing!r}")
    flat_e = b.op("Reshape", ids, b.ints(-1))  # [M = N k]: row r = token r // k, slot r % k
    experts = b.op("Range", b.scalar(0), b.op("Squeeze", b.dim(w1, 0)), b.scalar(1))  # [E]
    onehot = b.op("Cast", b.op("Equal", b.op("Unsqueeze", flat_e, b.ints(1)), b.op("Unsqueeze", experts, b.ints(0))),
                  to=TensorProto.INT32)  # [M, E]
    ends = b.op("CumSum", b.op("ReduceSum", onehot, b.ints(0), keepdims=0), b.scalar(0))  # [E]
    zero = b.op("Constant", value=helper.make_tensor("v", TensorProto.INT32, [1], [0]))
    offsets = b.op("Concat", zero, ends, axis=0)  # [E + 1] int32: expert e owns offsets[e]:offsets[e+1]
    before = b.op("CumSum", onehot, b.scalar(0), exclusive=1)  # [M, E]: earlier rows per expert
    rank = b.op("ReduceSum", b.op("Mul", before, onehot), b.ints(1), keepdims=0)  # [M]: rank in own expert
    pos = b.op("Cast", b.op("Add", b.op("Gather", offsets, flat_e), rank), to=TensorProto.INT64)  # [M]
    rows = b.op("Range", b.scalar(0), b.op("Squeeze", b.op("Shape", flat_e)), b.scalar(1))  # [M]
    order = b.op("ScatterElements", rows, pos, rows, axis=0)  # order[pos[r]] = r
    x_sorted = b.op("Gather", hidden, b.op("Div", order, b.scalar(k)))  # [M, d] grouped by expert
    h = _gemm_node(b, x_sorted, offsets, w1, b1, act)  # [M, f]
    y_sorted = _gemm_node(b, h, offsets, w2, b2, "identity")  # [M, d]
    y = b.op("Gather", y_sorted, pos)  # back to (token, slot) order
    y = b.op("Mul", y, b.op("Unsqueeze", b.op("Reshape", gates, b.ints(-1)), b.ints(1)))
    if k == 1:
        b.nodes.append(helper.make_node("Identity", [y], [n.output[0]]))
    else:
        shape = b.op("Concat", b.ints(-1, k), b.dim(hidden, 1), axis=0)
        b.nodes.append(helper.make_node("ReduceSum", [b.op("Reshape", y, shape), b.ints(1)], [n.output[0]],
                                        keepdims=0))  # sum over the k slots
    return b.nodes


def _activation_by_attribute(b: _Builder, z: str, elem: int) -> str:
    """``act(z)`` with ``act`` named by the function's ``activation`` attribute, chosen at run time.

    A function body cannot branch on a string attribute with default-domain ops at opset 18, so
    the attribute goes through ``ai.onnx.ml.LabelEncoder`` (string -> code) and a chain of ``If``
    nodes picks the activation. An unknown name gives NaN everywhere (loud, never a plausible
    wrong answer); ``smlp validate`` names the bad field."""
    ref = onnx.AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = "value_string", "activation", onnx.AttributeProto.STRING
    name = f"{b.prefix}act_name"
    const = helper.make_node("Constant", [], [name])
    const.attribute.append(ref)
    b.nodes.append(const)
    code = b.op("LabelEncoder", name, domain=ML_DOMAIN, keys_strings=list(GEMM_ACTIVATIONS),
                values_int64s=list(range(len(GEMM_ACTIVATIONS))), default_int64=-1)

    def branch(act: str | None, tag: str):
        sub = _Builder(prefix=f"{b.prefix}{tag}_")
        if act is None:  # unknown activation name
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
        then.nodes.append(helper.make_node("Identity", [y], [out_info[0].name]))
        sub.nodes.append(helper.make_node("Identity", [result], [f"{b.prefix}{act}_else_out"]))
        else_g = helper.make_graph(sub.nodes, f"{b.prefix}{act}_else", [],
                                   [helper.make_tensor_value_info(f"{b.prefix}{act}_else_out", elem, None)])
        then_g = helper.make_graph(then.nodes, f"{b.prefix}{act}_then", [], out_info)
        sub = _Builder(prefix=f"{b.prefix}c{i}_")
        cond = sub.op("Squeeze", sub.op("Equal", code, sub.scalar(i)))
        result = sub.op("If", cond, then_branch=then_g, else_branch=else_g)
    b.nodes += sub.nodes
    return result


def grouped_gemm_function(*, elem: int, opset: int) -> FunctionProto:
    """Fallback body of SMLPGroupedExpertGemm (any activation the node names).

    x [M, K], offsets [E + 1] int32, weight [E, N, K], bias [E, N] -> [M, N]: a Loop over the
    experts; iteration e multiplies rows ``offsets[e]:offsets[e+1]`` only (an expert with no rows
    does a 0-row Gemm) and appends them, so rows stay in order; then the activation the node's
    ``activation`` field names (elementwise, so applying it after the loop is the same math)."""
    b = _Builder(prefix="gg_")
    x, offsets, weight, bias = GEMM.inputs
    offs = b.op("Cast", offsets, to=TensorProto.INT64)
    sub = _Builder(prefix="gg_e_")
    i, cond_in, acc_in = "gg_i", "gg_cond_in", "gg_acc_in"
    idx = sub.op("Unsqueeze", i, sub.ints(0))
    lo = sub.op("Gather", offs, idx)
    hi = sub.op("Gather", offs, sub.op("Add", idx, sub.ints(1)))
    chunk = sub.op("Slice", x, lo, hi, sub.ints(0))
    y = sub.op("Gemm", chunk, sub.op("Gather", weight, i), sub.op("Gather", bias, i), transB=1)  # [n_e, N]
    acc = sub.op("Concat", acc_in, y, axis=0)
    cond = sub.op("Identity", cond_in)
    body = helper.make_graph(
        sub.nodes, "gg_expert_body",
        [helper.make_tensor_value_info(i, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
         helper.make_tensor_value_info(acc_in, elem, None)],
        [helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
         helper.make_tensor_value_info(acc, elem, None)])
    empty = b.op("Slice", bias, b.ints(0), b.ints(0), b.ints(0))  # [0, N]: the start of the concat
    true = b.op("Constant", value=helper.make_tensor("v", TensorProto.BOOL, [], [True]))
    z = b.op("Loop", b.op("Squeeze", b.dim(weight, 0)), true, empty, body=body)
    out = _activation_by_attribute(b, z, elem)
    b.nodes.append(helper.make_node("Identity", [out], [GEMM.outputs[0]]))
    return helper.make_function(GEMM.domain, GEMM.op_type, list(GEMM.inputs), list(GEMM.outputs), b.nodes,
                                opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ML_DOMAIN, 2)],
                                attributes=[*GEMM.attributes, *PLUGIN_ATTRS])


def lower_token_moe(model: onnx.ModelProto, *, elem: int, opset: int) -> int:
    """Rewrite every top-level SMLPTokenMoE node (see the module docstring) and add the
    grouped-GEMM fallback functions it needs. Returns how many layers were rewritten."""
    nodes: list[NodeProto] = []
    count = 0
    for n in model.graph.node:
        if (n.domain, n.op_type) != (TOKEN_MOE_NODE.domain, TOKEN_MOE_NODE.op_type):
            nodes.append(n)
            continue
        nodes += token_moe_nodes(n, prefix=f"tmoe{count}_")
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if count and not any((f.domain, f.name) == (GEMM.domain, GEMM.op_type) for f in model.functions):
        model.functions.append(grouped_gemm_function(elem=elem, opset=opset))
        if not any(o.domain == ML_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(ML_DOMAIN, 2))
    return count


def finish_tensorrt(model: onnx.ModelProto, *, elem: int, opset: int) -> None:
    """The tensorrt target's graph pass (model.onnx and decode.onnx): lower token MoE, name the
    plugin nodes. The spatial MoE nodes stay one plugin node each."""
    lower_token_moe(model, elem=elem, opset=opset)
    name_plugin_nodes(model)


__all__ = ["finish_tensorrt", "lower_token_moe", "token_moe_nodes", "grouped_gemm_function", "plugin_node_name", "name_plugin_nodes"]
