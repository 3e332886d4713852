"""ONNX graph builders of the MoE stages, shared by every target.

- :class:`GraphBuilder`: accumulates nodes with unique, readable value names;
- :func:`permute_by_expert`: the counting sort of ``smlp_export.permutation`` mirrored op for op;
- :func:`expert_loop`: each expert's slice of the grouped rows through a per-expert body, as a
  ``Loop`` (any expert count) or written out for a static count (``unroll``);
- :func:`token_moe`: routing -> permutation -> grouped experts -> un-permute, gate, sum over k.

Used by the model-local function bodies (``functions.py``: portable / ort / the tensorrt
fallbacks) and by the tensorrt lowering (``tensorrt_moe.py``), so each stage is written once.

TensorRT's ONNX parser (onnx-tensorrt operator matrix, 10.16) shapes two choices here: CumSum
runs in float32 (the matrix lists CumSum for FP32/FP16/BF16 only; counts are exact up to
``MAX_GRAPH_ROWS`` = 2^24 rows, and ``smlp build-engine`` refuses profiles that allow more), and
the Loop's carried tensor keeps one shape across iterations (a zero-initialised [M, width]
result that each expert scatters its rows into, not a Concat that grows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from onnx import GraphProto, NodeProto, TensorProto, helper

# Counts are float32 (see the module docstring): every integer up to 2^24 is exact in float32, so
# the permutation is exact for at most this many routed rows per layer call (batch x seq x k).
MAX_GRAPH_ROWS = 1 << 24


@dataclass
class GraphBuilder:
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

    def output(self, value: str, name: str) -> None:
        """Make ``value`` (produced by the last node) available under ``name``."""
        last = self.nodes[-1]
        if list(last.output) == [value]:
            last.output[0] = name
        else:
            self.nodes.append(helper.make_node("Identity", [value], [name]))


def activation(b: GraphBuilder, name: str, x: str) -> str:
    """Expert activations, written out so the body needs no opset-20 Gelu (matches torch)."""
    if name == "identity":
        return x
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


class Permutation(NamedTuple):
    """Value names of ``permutation.ExpertPermutation`` in a graph: order [M] int64, position [M]
    int64, offsets [E + 1] int32 (the grouped-GEMM plugin's offsets type)."""

    order: str
    position: str
    offsets: str


def permute_by_expert(b: GraphBuilder, flat_e: str, n_experts: str) -> Permutation:
    """The counting sort of ``smlp_export.permutation.permute_by_expert``, one node per step.

    flat_e [M] int64 expert ids, n_experts a 1-D int64 [1]. Counts are float32 (exact for
    M <= 2^24, see the module docstring); only the results are cast to integers."""
    f32 = TensorProto.FLOAT
    experts = b.op("Range", b.scalar(0), b.op("Squeeze", n_experts), b.scalar(1))  # [E]
    onehot = b.op("Cast", b.op("Equal", b.op("Unsqueeze", flat_e, b.ints(1)), b.op("Unsqueeze", experts, b.ints(0))),
                  to=f32)  # [M, E]
    ends = b.op("CumSum", b.op("ReduceSum", onehot, b.ints(0), keepdims=0), b.scalar(0))  # [E]
    zero = b.op("Constant", value=helper.make_tensor("v", f32, [1], [0.0]))
    offsets = b.op("Concat", zero, ends, axis=0)  # [E + 1]: expert e owns offsets[e]:offsets[e+1]
    before = b.op("CumSum", onehot, b.scalar(0), exclusive=1)  # [M, E]: earlier rows per expert
    rank = b.op("ReduceSum", b.op("Mul", before, onehot), b.ints(1), keepdims=0)  # [M]: rank in own expert
    position = b.op("Cast", b.op("Add", b.op("Gather", offsets, flat_e), rank), to=TensorProto.INT64)  # [M]
    rows = b.op("Range", b.scalar(0), b.op("Squeeze", b.op("Shape", flat_e)), b.scalar(1))  # [M]
    order = b.op("ScatterElements", rows, position, rows, axis=0)  # order[position[r]] = r
    return Permutation(order, position, b.op("Cast", offsets, to=TensorProto.INT32))


# body(builder, rows of expert e [n_e, K], e as an int64 scalar) -> [n_e, width]
ExpertBody = Callable[[GraphBuilder, str, str], str]


def expert_loop(b: GraphBuilder, rows: str, offsets: str, n_experts: str, *, elem: int, width: str,
                body: ExpertBody, unroll: int | None = None) -> str:
    """``y[offsets[e]:offsets[e+1]] = body(rows[offsets[e]:offsets[e+1]], e)`` for every expert e.

    rows [M, K] grouped by expert; offsets [E + 1] (int32 or int64); n_experts, width 1-D int64
    [1]; elem the element type of the result [M, width]. Sparse: each expert multiplies only its
    own rows (an expert with no rows does a 0-row product). ``unroll=E`` writes the E slices out
    and concatenates once (ONNX Runtime pays per Loop iteration, and ``Gather(w, constant e)``
    then folds at session load); None is a ``Loop`` whose carried result is a zero-initialised
    [M, width] tensor each iteration scatters into (one shape across iterations: TensorRT)."""
    offs = b.op("Cast", offsets, to=TensorProto.INT64)
    if unroll:
        ys = []
        for e in range(unroll):
            lo, hi = b.op("Slice", offs, b.ints(e), b.ints(e + 1)), b.op("Slice", offs, b.ints(e + 1), b.ints(e + 2))
            ys.append(body(b, b.op("Slice", rows, lo, hi, b.ints(0)), b.scalar(e)))
        return b.op("Concat", *ys, axis=0)
    sub = GraphBuilder(prefix=f"{b.prefix}e_")
    i, cond_in, acc_in = f"{b.prefix}i", f"{b.prefix}cond_in", f"{b.prefix}acc_in"
    lo = sub.op("Gather", offs, i)
    hi = sub.op("Gather", offs, sub.op("Add", i, sub.scalar(1)))
    index = sub.op("Range", lo, hi, sub.scalar(1))  # [n_e]: this expert's rows
    y = body(sub, sub.op("Gather", rows, index), i)
    acc = sub.op("ScatterND", acc_in, sub.op("Unsqueeze", index, sub.ints(1)), y)
    cond = sub.op("Identity", cond_in)
    graph: GraphProto = helper.make_graph(
        sub.nodes, f"{b.prefix}expert_body",
        [helper.make_tensor_value_info(i, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
         helper.make_tensor_value_info(acc_in, elem, None)],
        [helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
         helper.make_tensor_value_info(acc, elem, None)],
    )
    shape = b.op("Concat", b.dim(rows, 0), width, axis=0)
    zero = helper.make_tensor("v", elem, [1], [0])
    if elem == TensorProto.BFLOAT16:
        # ConstantOfShape outputs bfloat16 only from opset 20; the graphs are opset 18 by default,
        # so a bf16 zero tensor is a broadcast (Expand takes bfloat16 since opset 13).
        zeros = b.op("Expand", b.op("Constant", value=zero), shape)
    else:
        zeros = b.op("ConstantOfShape", shape, value=zero)
    true = b.op("Constant", value=helper.make_tensor("v", TensorProto.BOOL, [], [True]))
    return b.op("Loop", b.op("Squeeze", n_experts), true, zeros, body=graph)


# experts(builder, x_sorted [M, d] grouped by expert, permutation) -> y_sorted [M, d]
GroupedExperts = Callable[[GraphBuilder, str, Permutation], str]


def token_moe(b: GraphBuilder, hidden: str, logits: str, n_experts: str, *, routing: str, k: int, elem: int,
              experts: GroupedExperts) -> str:
    """Token MoE around a grouped-expert stage. hidden [N, d], logits [N, E] -> [N, d]
    = sum over the k chosen experts of gate * expert(hidden); ``experts`` maps the rows grouped
    by expert to their outputs (an expert loop, or grouped-GEMM plugin nodes)."""
    # ONNX TopK has no bfloat16 kernel type (opset <= 23): a bf16 graph ranks the logits in
    # float32 (exact: every bf16 value is a float32) and casts the gates back.
    ranked = b.op("Cast", logits, to=TensorProto.FLOAT) if elem == TensorProto.BFLOAT16 else logits
    vals, ids = b.op("TopK", ranked, b.ints(k), axis=-1, largest=1, sorted=1, n_out=2)  # [N, k]
    if routing == "base":  # Base Layers: greedy top-1, gate = sigmoid(affinity)
        if k != 1:
            raise ValueError(f"routing 'base' is top-1, got k={k}")
        gates = b.op("Sigmoid", vals)
    elif routing == "topk":  # softmax over the k largest logits
        gates = b.op("Softmax", vals, axis=-1)
    else:
        raise ValueError(f"unknown routing {routing!r}")
    if ranked != logits:
        gates = b.op("CastLike", gates, hidden)
    flat_e = b.op("Reshape", ids, b.ints(-1))  # [M = N k]: row r = token r // k, slot r % k
    perm = permute_by_expert(b, flat_e, n_experts)
    x_sorted = b.op("Gather", hidden, b.op("Div", perm.order, b.scalar(k)))  # [M, d] grouped by expert
    y = b.op("Gather", experts(b, x_sorted, perm), perm.position)  # back to (token, slot) order
    y = b.op("Mul", y, b.op("Unsqueeze", b.op("Reshape", gates, b.ints(-1)), b.ints(1)))
    if k == 1:
        return y
    shape = b.op("Concat", b.ints(-1, k), b.dim(hidden, 1), axis=0)
    return b.op("ReduceSum", b.op("Reshape", y, shape), b.ints(1), keepdims=0)  # sum over the k slots


__all__ = ["MAX_GRAPH_ROWS", "GraphBuilder", "Permutation", "activation", "expert_loop", "permute_by_expert", "token_moe"]
