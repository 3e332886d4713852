"""Standard-op bodies of the smlp MoE nodes, as ONNX ``FunctionProto``s.

One body per contract op (see ``contract.py``); they are the single definition of what an
``smlp`` node computes in plain ONNX:

- ``--target tensorrt`` ships them as model-local functions next to the plugin nodes, so any
  runtime without the plugin (ONNX Runtime, the reference evaluator) runs the same file;
- ``--target portable`` (and ``ort`` for the layers ORT has no fused op for) inlines them.

The bodies are *sparse*: token MoE sorts the (token, slot) pairs by expert and a ``Loop`` over
experts multiplies each expert's contiguous slice only (an expert with no token does a 0-row
Gemm); the partial spatial MoE does the same over (sequence, channel) columns. No body evaluates
every expert on every token. Deterministic spatial MoE needs no sort: chunk i of the channels is
expert i's by construction, so one batched MatMul over the expert axis is the exact formulation.

Bodies are generated for one model: the activation and routing kind are fixed at export (the
node's attributes are still declared, and the exporter writes the same values on the node), and
float constants are ``CastLike``'d to the input so one body serves fp32 and fp16. Loop bodies need
typed inputs, so the element type is a parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from onnx import FunctionProto, GraphProto, NodeProto, TensorProto, helper

from . import contract

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


@dataclass
class _Builder:
    """Accumulates nodes with unique, readable value names (``prefix`` keeps subgraphs apart)."""

    prefix: str
    nodes: list[NodeProto] = field(default_factory=list)
    _n: int = 0

    def op(self, op_type: str, *inputs: str, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [f"{self.prefix}{op_type.lower()}_{self._n}" + (f"_{i}" if n_out > 1 else "") for i in range(n_out)]
        self._n += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def ints(self, *values: int) -> str:
        """A 1-D int64 constant."""
        return self.op("Constant", value=helper.make_tensor("v", TensorProto.INT64, [len(values)], list(values)))

    def scalar(self, value: int) -> str:
        return self.op("Constant", value=helper.make_tensor("v", TensorProto.INT64, [], [value]))

    def fconst(self, value: float, like: str) -> str:
        """A float scalar with the element type of ``like`` (fp32 and fp16 bodies alike)."""
        c = self.op("Constant", value=helper.make_tensor("v", TensorProto.FLOAT, [], [value]))
        return self.op("CastLike", c, like)

    def dim(self, x: str, axis: int) -> str:
        """Size of one axis of ``x`` as a 1-D int64 [1]."""
        return self.op("Shape", x, start=axis, end=axis + 1)


def activation(b: _Builder, name: str, x: str) -> str:
    """Expert activations, written out so the body needs no opset-20 Gelu (matches torch)."""
    if name == "relu":
        return b.op("Relu", x)
    if name == "silu":
        return b.op("Mul", x, b.op("Sigmoid", x))
    half = b.op("Mul", x, b.fconst(0.5, x))
    if name == "gelu":  # 0.5 x (1 + erf(x / sqrt 2))
        inner = b.op("Erf", b.op("Mul", x, b.fconst(1 / math.sqrt(2), x)))
    elif name == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = b.op("Mul", b.op("Mul", x, x), x)
        poly = b.op("Add", x, b.op("Mul", cube, b.fconst(0.044715, x)))
        inner = b.op("Tanh", b.op("Mul", poly, b.fconst(math.sqrt(2 / math.pi), x)))
    else:
        raise ValueError(f"unknown activation {name!r}")
    return b.op("Mul", half, b.op("Add", inner, b.fconst(1.0, x)))


def _sort_by_expert(b: _Builder, flat_e: str, n_experts: str) -> tuple[str, str, str, str]:
    """Stable sort of rows by expert id.

    flat_e [M] int64 -> (order [M]: row ids grouped by expert, ascending row id within an expert,
    inverse [M]: position of each row in ``order``, starts [E], ends [E]: each expert's slice).
    The key ``expert * M + row`` is unique, so TopK's order is fully determined (no tie rules).
    """
    m = b.op("Shape", flat_e)
    m0 = b.op("Squeeze", m)
    pos = b.op("Range", b.scalar(0), m0, b.scalar(1))
    key = b.op("Add", b.op("Mul", flat_e, m), pos)
    _, order = b.op("TopK", key, m, axis=0, largest=0, sorted=1, n_out=2)
    inverse = b.op("ScatterElements", pos, order, pos, axis=0)
    experts = b.op("Range", b.scalar(0), b.op("Squeeze", n_experts), b.scalar(1))
    onehot = b.op("Equal", b.op("Unsqueeze", flat_e, b.ints(1)), b.op("Unsqueeze", experts, b.ints(0)))
    counts = b.op("ReduceSum", b.op("Cast", onehot, to=TensorProto.INT64), b.ints(0), keepdims=0)
    ends = b.op("CumSum", counts, b.scalar(0))
    starts = b.op("Sub", ends, counts)
    return order, inverse, starts, ends


def _expert_loop(b: _Builder, rows: str, starts: str, ends: str, n_experts: str, elem: int,
                 body_fn) -> str:
    """Loop over experts; iteration i computes ``body_fn(sub, rows[starts[i]:ends[i]], i)`` and
    appends it to the carried result (rows stay in sorted order). Returns [M, out_width]."""
    sub = _Builder(prefix=f"{b.prefix}e_")
    i, cond_in, acc_in = f"{b.prefix}i", f"{b.prefix}cond_in", f"{b.prefix}acc_in"
    idx = sub.op("Unsqueeze", i, sub.ints(0))
    lo = sub.op("Gather", starts, idx)
    hi = sub.op("Gather", ends, idx)
    chunk = sub.op("Slice", rows, lo, hi, sub.ints(0))
    y = body_fn(sub, chunk, i)
    acc = sub.op("Concat", acc_in, y, axis=0)
    cond = sub.op("Identity", cond_in)
    graph: GraphProto = helper.make_graph(
        sub.nodes, f"{b.prefix}expert_body",
        [helper.make_tensor_value_info(i, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
         helper.make_tensor_value_info(acc_in, elem, None)],
        [helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
         helper.make_tensor_value_info(acc, elem, None)],
    )
    empty = b.op("Slice", rows, b.ints(0), b.ints(0), b.ints(0))  # [0, width]: the start of the concat
    # The carried tensor's first dimension grows each iteration; the widths of token MoE (d -> d)
    # and spatial MoE (T -> T) match the input rows, so ``empty`` has the right width.
    true = b.op("Constant", value=helper.make_tensor("v", TensorProto.BOOL, [], [True]))
    return b.op("Loop", b.op("Squeeze", n_experts), true, empty, body=graph)


def _function(c: contract.PluginContract, b: _Builder, outputs: list[str], opset: int) -> FunctionProto:
    # The body's result must carry the contract's output name.
    b.nodes.append(helper.make_node("Identity", [outputs[0]], [c.outputs[0]]))
    extra = sorted({n.domain for n in b.nodes if n.domain not in ("", "ai.onnx")})
    return helper.make_function(
        c.domain, c.op_type, list(c.inputs), list(c.outputs), b.nodes,
        opset_imports=[helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in extra]],
        attributes=[*c.attributes, *PLUGIN_ATTRS],
    )


def _expert_unrolled(b: _Builder, rows: str, starts: str, ends: str, n_experts: int, body_fn) -> str:
    """The ``_expert_loop`` computation written out for a static expert count: expert e's slice
    ``rows[starts[e]:ends[e]]`` through ``body_fn(b, slice, e_scalar)``, one Concat at the end.

    Why: ONNX Runtime's Loop pays per iteration (subgraph state, a Gather copying the expert's
    weights, a Concat re-copying the growing result); unrolled, ``Gather(w, constant e)`` is
    constant-folded at session load and the result is concatenated once. Still sparse: each
    expert multiplies only its own rows."""
    ys = []
    for e in range(n_experts):
        lo = b.op("Slice", starts, b.ints(e), b.ints(e + 1))
        hi = b.op("Slice", ends, b.ints(e), b.ints(e + 1))
        ys.append(body_fn(b, b.op("Slice", rows, lo, hi, b.ints(0)), b.scalar(e)))
    return b.op("Concat", *ys, axis=0)


def token_moe_function(*, routing: str, k: int, activation_name: str, elem: int, opset: int,
                       unroll_experts: int | None = None) -> FunctionProto:
    """SMLPTokenMoE body. hidden [N, d], router_logits [N, E], w1 [E, f, d], b1 [E, f],
    w2 [E, d, f], b2 [E, d] -> output [N, d] = sum over the k chosen experts of gate * FFN_e(hidden).

    ``unroll_experts=E`` (the ort target, where E is the model's static count) writes the expert
    Loop out (``_expert_unrolled``) and uses com.microsoft.FastGelu for tanh-GELU experts; None
    keeps the Loop and default-domain ops only (one body for any E, any runtime)."""
    b = _Builder(prefix="tm_")
    hidden, logits, w1, b1, w2, b2 = TOKEN_MOE_NODE.inputs
    # ONNX TopK has no bfloat16 kernel type (opset <= 23): a bf16 body ranks the logits in
    # float32 (exact: every bf16 value is a float32) and casts the gates back.
    ranked = b.op("Cast", logits, to=TensorProto.FLOAT) if elem == TensorProto.BFLOAT16 else logits
    vals, ids = b.op("TopK", ranked, b.ints(k), axis=-1, largest=1, sorted=1, n_out=2)  # [N, k]
    if routing == "base":  # Base Layers: greedy top-1, gate = sigmoid(affinity)
        gates = b.op("Sigmoid", vals)
    elif routing == "topk":  # softmax over the k largest logits
        gates = b.op("Softmax", vals, axis=-1)
    else:
        raise ValueError(f"unknown routing {routing!r}")
    if ranked != logits:
        gates = b.op("CastLike", gates, hidden)
    flat_e = b.op("Reshape", ids, b.ints(-1))  # [M = N k], row r = token r // k, slot r % k
    n_exp = b.dim(w1, 0)
    order, inverse, starts, ends = _sort_by_expert(b, flat_e, n_exp)
    token_of = b.op("Div", order, b.ints(k))
    x_sorted = b.op("Gather", hidden, token_of)  # [M, d]

    def ffn(sub: _Builder, rows: str, i: str) -> str:
        h = sub.op("Gemm", rows, sub.op("Gather", w1, i), sub.op("Gather", b1, i), transB=1)  # [n_e, f]
        if unroll_experts and activation_name == "gelu_tanh":
            # ort target only: ONNX Runtime's FastGelu is this exact tanh formula, one kernel
            # instead of nine elementwise nodes per expert.
            h = sub.op("FastGelu", h, domain="com.microsoft")
        else:
            h = activation(sub, activation_name, h)
        return sub.op("Gemm", h, sub.op("Gather", w2, i), sub.op("Gather", b2, i), transB=1)  # [n_e, d]

    if unroll_experts:
        y_sorted = _expert_unrolled(b, x_sorted, starts, ends, unroll_experts, ffn)
    else:
        y_sorted = _expert_loop(b, x_sorted, starts, ends, n_exp, elem, ffn)
    g_sorted = b.op("Gather", b.op("Reshape", gates, b.ints(-1)), order)
    y_sorted = b.op("Mul", y_sorted, b.op("Unsqueeze", g_sorted, b.ints(1)))
    y = b.op("Gather", y_sorted, inverse)  # back to (token, slot) order
    shape = b.op("Concat", b.ints(-1, k), b.dim(hidden, 1), axis=0)
    out = b.op("ReduceSum", b.op("Reshape", y, shape), b.ints(1), keepdims=0)  # sum over the k slots
    return _function(TOKEN_MOE_NODE, b, [out], opset)


def _causal(b: _Builder, weight: str, t: str, axes: tuple[int, int]) -> str:
    """weight [..., n, n] -> tril(weight[..., :T, :T])."""
    w = b.op("Slice", weight, b.ints(0, 0), b.op("Concat", t, t, axis=0), b.ints(*axes))
    return b.op("Trilu", w, upper=0)


def spatial_moe_function(*, opset: int) -> FunctionProto:
    """SMLPSpatialMoE body. z2 [B, T, c], weight [E, n, n], bias [E, n] -> [B, T, c]; channel
    chunk i (c / E channels) goes through expert i's causal projection."""
    b = _Builder(prefix="sm_")
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
    return _function(contract.SPATIAL_MOE, b, [out], opset)


def spatial_moe_partial_function(*, elem: int, opset: int) -> FunctionProto:
    """SMLPSpatialMoEPartial body. z2 [B, T, c], weight [E, n, n], bias [E, n], router_weight
    [p, E] -> [B, T, c]. Each (sequence, channel) column is routed on its first p positions
    (zero-padded when T < p) to argmax softmax(v @ router_weight), scaled by that probability."""
    b = _Builder(prefix="sp_")
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
    order, inverse, starts, ends = _sort_by_expert(b, flat_e, n_exp)
    rows = b.op("Gather", cols, order)

    def proj(sub: _Builder, chunk: str, i: str) -> str:
        w = _causal(sub, sub.op("Gather", weight, i), t, (0, 1))  # [T, T]
        bt = sub.op("Slice", sub.op("Gather", bias, i), sub.ints(0), t, sub.ints(0))
        return sub.op("Gemm", chunk, w, bt, transB=1)  # [n_e, T]

    y_sorted = _expert_loop(b, rows, starts, ends, n_exp, elem, proj)
    g_sorted = b.op("Gather", b.op("Reshape", gate, b.ints(-1)), order)
    y_sorted = b.op("Mul", y_sorted, b.op("Unsqueeze", g_sorted, b.ints(1)))
    y = b.op("Gather", y_sorted, inverse)  # [B c, T]
    y = b.op("Reshape", y, b.op("Concat", bb, c, t, axis=0))
    out = b.op("Transpose", y, perm=[0, 2, 1])
    return _function(contract.SPATIAL_MOE_PARTIAL, b, [out], opset)


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
