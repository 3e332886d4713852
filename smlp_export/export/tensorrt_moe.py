"""The ``tensorrt`` target's token MoE: standard-op routing + permutation around two grouped GEMMs.

The onnxscript rewriter rule ``TensorrtTokenMoE`` (run by ``rewrites.lower_tensorrt``) rewrites,
in the top-level graph, every
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
from onnxscript.rewriter import pattern

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


def _gemm_node(b: GraphBuilder, x: str, offsets: str, w: str, bias: str, act: str) -> str:
    return b.op(GEMM.op_type, x, offsets, w, bias, domain=GEMM.domain, activation=act,
                activation_index=GEMM_ACTIVATIONS.index(act), plugin_namespace=GEMM.namespace,
                plugin_version=GEMM.version)


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


class RuleBuilder:
    """``moe_graph.GraphBuilder``'s interface over an onnxscript rewriter's ``op``: the builders of
    ``moe_graph`` then emit onnx_ir values into a rule's replacement, under the value names
    ``GraphBuilder`` would give them (``prefix`` + op + counter)."""

    def __init__(self, op, prefix: str) -> None:
        self._op, self.prefix, self._n = op, prefix, 0

    def op(self, op_type: str, *inputs, n_out: int = 1, domain: str = "", **attrs):
        import onnx_ir as ir

        outs = [f"{self.prefix}{op_type.lower()}_{self._n}" + (f"_{i}" if n_out > 1 else "") for i in range(n_out)]
        self._n += 1
        # sorted like onnx.helper.make_node writes them
        attrs = {k: ir.serde.deserialize_tensor(v) if isinstance(v, TensorProto) else v for k, v in sorted(attrs.items())}
        return getattr(self._op, op_type)(*inputs, _domain=domain, _outputs=outs, **attrs)

    ints, scalar, fconst, dim = GraphBuilder.ints, GraphBuilder.scalar, GraphBuilder.fconst, GraphBuilder.dim


class TensorrtTokenMoE(pattern.RewriteRuleClassBase):
    """tensorrt: each top-level ``smlp::SMLPTokenMoE`` node -> ``moe_graph.token_moe`` with two
    grouped-GEMM plugin nodes as its expert stage (see the module docstring)."""

    def __init__(self, elem: int) -> None:
        self.elem, self.count = elem, 0
        super().__init__(name="TensorrtTokenMoE")

    def setup(self) -> None:
        self.count = 0  # value names tmoe{i}_*, i = the layer's place in graph order

    def pattern(self, op, hidden, logits, w1, b1, w2, b2):
        return op.SMLPTokenMoE(hidden, logits, w1, b1, w2, b2, _domain=TOKEN_MOE_NODE.domain,
                               _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, y, **_):
        from .optimize import top_level

        return top_level(context)

    def rewrite(self, op, hidden, logits, w1, b1, w2, b2, y):
        node = y.producer()
        a = {k: v.value for k, v in node.attributes.items()}
        b = RuleBuilder(op, prefix=f"tmoe{self.count}_")
        self.count += 1

        def experts(b, x_sorted, perm: Permutation):
            h = _gemm_node(b, x_sorted, perm.offsets, w1, b1, a["activation"])  # [M, f]
            return _gemm_node(b, h, perm.offsets, w2, b2, "identity")  # [M, d]

        try:
            out = token_moe(b, hidden, logits, b.dim(w1, 0), routing=a["routing"], k=int(a["k"]), elem=self.elem,
                            experts=experts)
        except ValueError as e:
            raise ValueError(f"{node.name or y.name}: {e}") from None
        out.name = y.name  # the layer's output keeps its name (the old value goes with its node)
        return out


def add_fallback_function(model: onnx.ModelProto, *, elem: int, opset: int) -> None:
    """The grouped-GEMM plugin nodes' standard-op fallback (``grouped_gemm_function``), once,
    when the top-level graph has such a node."""
    used = any((n.domain, n.op_type) == (GEMM.domain, GEMM.op_type) for n in model.graph.node)
    if used and not any((f.domain, f.name) == (GEMM.domain, GEMM.op_type) for f in model.functions):
        model.functions.append(grouped_gemm_function(elem=elem, opset=opset))


__all__ = ["add_fallback_function", "TensorrtTokenMoE", "grouped_gemm_function", "plugin_node_name", "name_plugin_nodes"]
