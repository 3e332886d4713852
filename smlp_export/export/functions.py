"""Standard-op bodies of the smlp MoE nodes, as ONNX ``FunctionProto``s.

One body per contract op (see ``contract.py``); they are the single definition of what an
``smlp`` node computes in plain ONNX:

- ``--target tensorrt`` ships them as model-local functions next to the plugin nodes, so any
  runtime without the plugin (ONNX Runtime, the reference evaluator) runs the same file;
- ``--target portable`` (and ``ort`` for the layers ORT has no fused op for) inlines them.

The bodies are *sparse*: token MoE groups the (token, slot) pairs by expert (the counting sort,
``moe_graph.permute_by_expert``) and a ``Loop`` over experts (``moe_graph.expert_loop``) multiplies
each expert's contiguous slice only (an expert with no token does a 0-row Gemm); the partial
spatial MoE does the same over (sequence, channel) columns. No body evaluates
every expert on every token. Deterministic spatial MoE needs no sort: chunk i of the channels is
expert i's by construction, so one batched MatMul over the expert axis is the exact formulation.

Bodies are generated for one model: the activation and routing kind are fixed at export (the
node's attributes are still declared, and the exporter writes the same values on the node), and
float constants are ``CastLike``'d to the input so one body serves fp32 and fp16. Loop bodies need
typed inputs, so the element type is a parameter.
"""
from __future__ import annotations

from onnx import FunctionProto, TensorProto, helper

from . import contract
from .moe_graph import GraphBuilder, Permutation, activation, expert_loop, permute_by_expert, token_moe

PLUGIN_ATTRS = ("plugin_namespace", "plugin_version")

# The exporter's intermediate node for ``torch.ops.smlp.token_moe`` (every target). It never reaches
# a file: ``ort`` / ``portable`` inline ``token_moe_function``'s body, ``tensorrt`` lowers it to
# standard ops + SMLPGroupedExpertGemm plugin nodes (``tensorrt_moe.py``). Not a TensorRT plugin,
# so not in ``contract.CONTRACTS``; the dataclass just carries its name, inputs and fields.
TOKEN_MOE_NODE = contract.PluginContract(
    op_type="SMLPTokenMoE",
    torch_op="smlp::token_moe",
    # hidden [N, d], router_logits [N, E], w1 [E, f, d], b1 [E, f], w2 [E, d, f], b2 [E, d]
    inputs=("hidden", "router_logits", "w1", "b1", "w2", "b2"),
    outputs=("output",),  # [N, d]
    attributes={"routing": str, "k": int, "activation": str},
)


def _function(c: contract.PluginContract, b: GraphBuilder, out: str, opset: int) -> FunctionProto:
    b.output(out, c.outputs[0])  # the body's result must carry the contract's output name
    extra = sorted({n.domain for n in b.nodes if n.domain not in ("", "ai.onnx")})
    return helper.make_function(
        c.domain, c.op_type, list(c.inputs), list(c.outputs), b.nodes,
        opset_imports=[helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in extra]],
        attributes=[*c.attributes, *c.fallback_attributes, *PLUGIN_ATTRS],
    )


def token_moe_function(*, routing: str, k: int, activation_name: str, elem: int, opset: int,
                       unroll_experts: int | None = None) -> FunctionProto:
    """SMLPTokenMoE body. hidden [N, d], router_logits [N, E], w1 [E, f, d], b1 [E, f],
    w2 [E, d, f], b2 [E, d] -> output [N, d] = sum over the k chosen experts of gate * FFN_e(hidden).

    ``unroll_experts=E`` (the ort target, where E is the model's static count) writes the expert
    loop out and uses com.microsoft.FastGelu for tanh-GELU experts; None keeps the Loop and
    default-domain ops only (one body for any E, any runtime)."""
    b = GraphBuilder(prefix="tm_")
    hidden, logits, w1, b1, w2, b2 = TOKEN_MOE_NODE.inputs

    def ffn(sub: GraphBuilder, rows: str, i: str) -> str:
        h = sub.op("Gemm", rows, sub.op("Gather", w1, i), sub.op("Gather", b1, i), transB=1)  # [n_e, f]
        if unroll_experts and activation_name == "gelu_tanh":
            # ort target only: ONNX Runtime's FastGelu is this exact tanh formula, one kernel
            # instead of nine elementwise nodes per expert.
            h = sub.op("FastGelu", h, domain="com.microsoft")
        else:
            h = activation(sub, activation_name, h)
        return sub.op("Gemm", h, sub.op("Gather", w2, i), sub.op("Gather", b2, i), transB=1)  # [n_e, d]

    def experts(b: GraphBuilder, x_sorted: str, perm: Permutation) -> str:
        return expert_loop(b, x_sorted, perm.offsets, b.dim(w1, 0), elem=elem, width=b.dim(hidden, 1), body=ffn,
                           unroll=unroll_experts)

    out = token_moe(b, hidden, logits, b.dim(w1, 0), routing=routing, k=k, elem=elem, experts=experts)
    return _function(TOKEN_MOE_NODE, b, out, opset)


def _causal(b: GraphBuilder, weight: str, t: str, axes: tuple[int, int]) -> str:
    """weight [..., n, n] -> tril(weight[..., :T, :T])."""
    w = b.op("Slice", weight, b.ints(0, 0), b.op("Concat", t, t, axis=0), b.ints(*axes))
    return b.op("Trilu", w, upper=0)


def spatial_moe_function(*, opset: int) -> FunctionProto:
    """SMLPSpatialMoE body. z2 [B, T, c], weight [E, n, n], bias [E, n] -> [B, T, c]; channel
    chunk i (c / E channels) goes through expert i's causal projection."""
    b = GraphBuilder(prefix="sm_")
    z2, weight, bias = contract.SPATIAL_MOE.inputs
    bb, t, c, e = b.dim(z2, 0), b.dim(z2, 1), b.dim(z2, 2), b.dim(weight, 0)
    cs = b.op("Div", c, e)
    zc = b.op("Reshape", z2, b.op("Concat", bb, t, e, cs, axis=0))  # [B, T, E, cs]
    zc = b.op("Transpose", zc, perm=[2, 1, 0, 3])  # [E, T, B, cs]
    zc = b.op("Reshape", zc, b.op("Concat", e, t, b.ints(-1), axis=0))  # [E, T, B cs]
    s = b.op("MatMul", _causal(b, weight, t, (1, 2)), zc)
    bt = b.op("Slice", bias, b.ints(0), t, b.ints(1))  # [E, T]
    s = b.op("Add", s, b.op("Unsqueeze", bt, b.ints(2)))
    s = b.op("Reshape", s, b.op("Concat", e, t, bb, cs, axis=0))
    s = b.op("Transpose", s, perm=[2, 1, 0, 3])  # [B, T, E, cs]
    out = b.op("Reshape", s, b.op("Concat", bb, t, c, axis=0))
    return _function(contract.SPATIAL_MOE, b, out, opset)


def spatial_moe_partial_function(*, elem: int, opset: int) -> FunctionProto:
    """SMLPSpatialMoEPartial body. z2 [B, T, c], weight [E, n, n], bias [E, n], router_weight
    [p, E] -> [B, T, c]. Each (sequence, channel) column is routed on its first p positions
    (zero-padded when T < p) to argmax softmax(v @ router_weight), scaled by that probability."""
    b = GraphBuilder(prefix="sp_")
    z2, weight, bias, router = contract.SPATIAL_MOE_PARTIAL.inputs
    bb, t, c, p = b.dim(z2, 0), b.dim(z2, 1), b.dim(z2, 2), b.dim(router, 0)
    v = b.op("Slice", z2, b.ints(0), p, b.ints(1))  # [B, min(T, p), c]
    missing = b.op("Sub", p, b.dim(v, 1))
    pads = b.op("Concat", b.ints(0, 0, 0, 0), missing, b.ints(0), axis=0)
    v = b.op("Pad", v, pads)  # [B, p, c]
    # [B, c, E]; torch computes the router product and its softmax in float32 whatever the model
    # dtype (route_channels); so does the body.
    vt = b.op("Cast", b.op("Transpose", v, perm=[0, 2, 1]), to=TensorProto.FLOAT)
    logits = b.op("MatMul", vt, b.op("Cast", router, to=TensorProto.FLOAT))
    probs32 = b.op("Softmax", logits, axis=-1)
    if elem == TensorProto.BFLOAT16:  # TopK has no bfloat16 type: rank the float32 probabilities
        gate, expert = b.op("TopK", probs32, b.ints(1), axis=-1, largest=1, sorted=1, n_out=2)
        gate = b.op("CastLike", gate, z2)
    else:
        probs = b.op("CastLike", probs32, z2)
        gate, expert = b.op("TopK", probs, b.ints(1), axis=-1, largest=1, sorted=1, n_out=2)  # [B, c, 1]
    cols = b.op("Reshape", b.op("Transpose", z2, perm=[0, 2, 1]), b.op("Concat", b.ints(-1), t, axis=0))  # [B c, T]
    flat_e = b.op("Reshape", expert, b.ints(-1))
    n_exp = b.dim(weight, 0)
    perm = permute_by_expert(b, flat_e, n_exp)
    rows = b.op("Gather", cols, perm.order)

    def proj(sub: GraphBuilder, chunk: str, i: str) -> str:
        w = _causal(sub, sub.op("Gather", weight, i), t, (0, 1))  # [T, T]
        bt = sub.op("Slice", sub.op("Gather", bias, i), sub.ints(0), t, sub.ints(0))
        return sub.op("Gemm", chunk, w, bt, transB=1)  # [n_e, T]

    y_sorted = expert_loop(b, rows, perm.offsets, n_exp, elem=elem, width=t, body=proj)
    y = b.op("Gather", y_sorted, perm.position)  # [B c, T] back in (sequence, channel) order
    y = b.op("Mul", y, b.op("Unsqueeze", b.op("Reshape", gate, b.ints(-1)), b.ints(1)))
    y = b.op("Reshape", y, b.op("Concat", bb, c, t, axis=0))
    out = b.op("Transpose", y, perm=[0, 2, 1])
    return _function(contract.SPATIAL_MOE_PARTIAL, b, out, opset)


def functions_for(cfg, *, elem: int, opset: int, op_types: set[str], unroll: bool = False) -> list[FunctionProto]:
    """The bodies a model with config ``cfg`` needs, for the smlp op types present, in a fixed order.

    ``unroll``: token MoE with the expert loop written out for ``cfg.n_token_experts`` (ort target)."""
    out = []
    if TOKEN_MOE_NODE.op_type in op_types:
        out.append(token_moe_function(routing=cfg.token_routing, k=cfg.top_k,
                                      activation_name=cfg.expert_activation, elem=elem, opset=opset,
                                      unroll_experts=cfg.n_token_experts if unroll else None))
    if contract.SPATIAL_MOE.op_type in op_types:
        out.append(spatial_moe_function(opset=opset))
    if contract.SPATIAL_MOE_PARTIAL.op_type in op_types:
        out.append(spatial_moe_partial_function(elem=elem, opset=opset))
    return out


def onnx_elem_type(dtype: str) -> int:
    return {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[dtype]


__all__ = ["TOKEN_MOE_NODE", "functions_for", "token_moe_function", "spatial_moe_function", "spatial_moe_partial_function",
           "activation", "onnx_elem_type", "PLUGIN_ATTRS"]
