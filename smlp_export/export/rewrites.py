"""The graph rewrites of each export target, in the order ``trace.finish`` runs them.

``Rewrites(target, ...)`` is one graph's pass list: ``before_inline`` works on the smlp nodes the
exporter wrote (ort ``auto``: token MoE -> If(fused, loop); tensorrt: token MoE -> routing +
grouped-GEMM plugin nodes), ``after_inline`` on the standard-op graph (ort: ``optimize.py``;
ort / portable: blocked-causal spatial products).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from .functions import TOKEN_MOE_NODE
from .translations import AUTO_FUSED_MAX_TOKENS, MSFT_DOMAIN, ORT_ACTIVATIONS


@dataclass(frozen=True)
class Rewrites:
    """What to rewrite in one graph of ``target``.

    ``ort_moe`` (ort): "auto" wraps each token-MoE node in an If (``_auto_token_moe``).
    ``optimize`` (ort): the exact rewrites of ``optimize.py``. ``causal_block`` (ort / portable):
    rows per block of the blocked-causal spatial products for ``max_seq_len`` (0: dense)."""

    target: str
    ort_moe: str = "fused"
    optimize: bool = False
    max_seq_len: int = 0
    causal_block: int = 0

    def before_inline(self, proto: onnx.ModelProto, *, elem: int, opset: int) -> None:
        if self.target == "ort" and self.ort_moe == "auto":
            _auto_token_moe(proto, elem)
        if self.target == "tensorrt":  # token MoE -> standard-op routing + two grouped-GEMM plugin nodes
            from .tensorrt_moe import finish_tensorrt

            finish_tensorrt(proto, elem=elem, opset=opset)

    def after_inline(self, proto: onnx.ModelProto) -> None:
        if self.target == "ort" and self.optimize:
            from .optimize import optimize_ort

            optimize_ort(proto)  # exact rewrites: pre-masked weights, fused GELU, split weights
        if self.target in ("ort", "portable") and self.causal_block:
            from .blocked_causal import block_causal_matmuls

            block_causal_matmuls(proto, self.max_seq_len, self.causal_block)


def _auto_token_moe(model: onnx.ModelProto, elem: int, max_tokens: int = AUTO_FUSED_MAX_TOKENS) -> None:
    """ort ``auto``: each mappable smlp token-MoE node -> If(N <= max_tokens, fused MoE, smlp node).

    The fused com.microsoft.MoE kernel wins for a few tokens (decode), the sort + Loop
    formulation for prompts and batches (docs/export.md has the figures); the If picks per call
    from the runtime token count N = hidden.shape[0]. The else branch keeps the smlp node, which
    the inliner then replaces by its Loop body. Both branches read the same outer-scope values.
    """
    h = onnx.helper
    nodes: list[onnx.NodeProto] = []
    for i, n in enumerate(model.graph.node):
        attrs = {a.name: h.get_attribute_value(a) for a in n.attribute}
        act = attrs.get("activation", b"").decode()
        if (n.domain, n.op_type) != (TOKEN_MOE_NODE.domain, TOKEN_MOE_NODE.op_type) or act not in ORT_ACTIVATIONS:
            nodes.append(n)
            continue
        hidden, logits = n.input[0], n.input[1]
        p = f"auto_moe_{i}_"
        out_info = [h.make_tensor_value_info(p + "y", elem, None)]
        fused = [h.make_node("MoE", list(n.input), [p + "moe" if attrs["routing"] == b"base" else p + "y"],
                             domain=MSFT_DOMAIN, k=int(attrs["k"]), activation_type=ORT_ACTIVATIONS[act],
                             normalize_routing_weights=1)]
        if attrs["routing"] == b"base":  # k = 1 renormalised is 1; Base Layers' gate is sigmoid(max logit)
            fused += [h.make_node("Constant", [], [p + "axes"], value_ints=[-1]),
                      h.make_node("ReduceMax", [logits, p + "axes"], [p + "top"], keepdims=1),
                      h.make_node("Sigmoid", [p + "top"], [p + "gate"]),
                      h.make_node("Mul", [p + "moe", p + "gate"], [p + "y"])]
        loop = onnx.NodeProto()
        loop.CopyFrom(n)
        del loop.output[:]
        loop.output.append(p + "y")
        nodes += [h.make_node("Shape", [hidden], [p + "n"], start=0, end=1),
                  h.make_node("Constant", [], [p + "max"], value_ints=[max_tokens]),
                  h.make_node("LessOrEqual", [p + "n", p + "max"], [p + "le"]),
                  h.make_node("Squeeze", [p + "le"], [p + "cond"]),
                  h.make_node("If", [p + "cond"], list(n.output),
                              then_branch=h.make_graph(fused, p + "fused", [], out_info),
                              else_branch=h.make_graph([loop], p + "loop", [], out_info))]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if any(n.op_type == "If" and n.output for n in nodes) and not any(o.domain == MSFT_DOMAIN for o in model.opset_import):
        model.opset_import.append(h.make_opsetid(MSFT_DOMAIN, 1))


