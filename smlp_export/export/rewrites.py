"""The graph rewrites of each export target, in the order ``trace.finish`` runs them.

``Rewrites(target, ...)`` is one graph's pass list: ``before_inline`` works on the smlp nodes the
exporter wrote (ort ``auto``: the ``AutoTokenMoE`` rule, token MoE -> If(fused, loop); tensorrt:
``tensorrt_moe.TensorrtTokenMoE``, token MoE -> routing + grouped-GEMM plugin nodes), ``after_inline`` on the standard-op graph
(ort: ``optimize.ORT_RULES``; ort / portable: ``blocked_causal.causal_rules``). Rules are
onnxscript rewriter rules (pattern, check, replacement) run on onnx_ir by ``apply_rules``.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnxscript.rewriter import pattern

from .functions import TOKEN_MOE_NODE
from .optimize import top_level
from .translations import AUTO_FUSED_MAX_TOKENS, MSFT_DOMAIN, ORT_ACTIVATIONS


@dataclass(frozen=True)
class Rewrites:
    """What to rewrite in one graph of ``target``.

    ``ort_moe`` (ort): "auto" wraps each token-MoE node in an If (``AutoTokenMoE``).
    ``optimize``: the standard-op graph's rules (ort: ``optimize.ORT_RULES``; ort / portable:
    blocked-causal spatial products of ``causal_block`` rows for ``max_seq_len``, 0: dense);
    model.onnx only (a decode step's spatial form has no causal product)."""

    target: str
    ort_moe: str = "fused"
    optimize: bool = False
    max_seq_len: int = 0
    causal_block: int = 0

    def before_inline(self, proto: onnx.ModelProto, *, elem: int, opset: int) -> onnx.ModelProto:
        if self.target == "ort" and self.ort_moe == "auto":
            proto = apply_rules(proto, [pattern.RewriteRuleSet([AutoTokenMoE.rule(elem)])])
        if self.target == "tensorrt":  # token MoE -> standard-op routing + two grouped-GEMM plugin nodes
            proto = lower_tensorrt(proto, elem=elem, opset=opset)
        return proto

    def after_inline_rules(self) -> list:
        """The rule sets for the standard-op graph, in the order they run."""
        sets = []
        if self.target == "ort" and self.optimize:
            from .optimize import ORT_RULES

            sets += ORT_RULES  # exact rewrites: pre-masked weights, fused GELU, split weights
        if self.target in ("ort", "portable") and self.optimize:
            from .blocked_causal import causal_rules

            sets += [r for r in [causal_rules(self.max_seq_len, self.causal_block)] if r is not None]
        return sets

    def after_inline(self, proto: onnx.ModelProto) -> onnx.ModelProto:
        sets = self.after_inline_rules()
        return apply_rules(proto, sets) if sets else proto


def lower_tensorrt(proto: onnx.ModelProto, *, elem: int, opset: int) -> onnx.ModelProto:
    """The tensorrt target's pass (model.onnx and decode graphs): every top-level token-MoE node
    rewritten (``tensorrt_moe.TensorrtTokenMoE``), the grouped-GEMM fallback function added, the
    plugin nodes named (``name_plugin_nodes``; the spatial MoE nodes stay one plugin node each).
    ``proto`` is consumed."""
    from .tensorrt_moe import TensorrtTokenMoE, add_fallback_function, name_plugin_nodes

    proto = apply_rules(proto, [pattern.RewriteRuleSet([TensorrtTokenMoE.rule(elem)])])
    add_fallback_function(proto, elem=elem, opset=opset)
    name_plugin_nodes(proto)
    return proto


def apply_rules(proto: onnx.ModelProto, rule_sets) -> onnx.ModelProto:
    """``proto`` rewritten by each onnxscript ``RewriteRuleSet`` of ``rule_sets`` in turn, on
    onnx_ir (placeholder weights travel as recipes: ``weights.to_ir``); nodes and initializers
    nothing reads any more are dropped, and value_info is kept for the values that had one.
    ``proto`` is consumed."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from .weights import from_ir, to_ir

    typed = {v.name for v in proto.graph.value_info}
    model = to_ir(proto)
    for rules in rule_sets:
        rules.apply_to_model(model)
    RemoveUnusedNodesPass()(model)
    return from_ir(model, value_info=typed)


class AutoTokenMoE(pattern.RewriteRuleClassBase):
    """ort ``auto``: each mappable smlp token-MoE node -> If(N <= max_tokens, fused MoE, smlp node).

    The fused com.microsoft.MoE kernel wins for a few tokens (decode), the sort + Loop
    formulation for prompts and batches (docs/export.md has the figures); the If picks per call
    from the runtime token count N = hidden.shape[0]. The else branch keeps the smlp node, which
    the inliner then replaces by its Loop body. Both branches read the same outer-scope values.
    """

    def __init__(self, elem: int, max_tokens: int = AUTO_FUSED_MAX_TOKENS) -> None:
        self.elem, self.max_tokens, self.count = elem, max_tokens, 0
        super().__init__(name="AutoTokenMoE")

    def setup(self) -> None:
        self.count = 0  # value names auto_moe_{i}_*, i = the layer's place in graph order

    def pattern(self, op, hidden, logits, w1, b1, w2, b2):
        return op.SMLPTokenMoE(hidden, logits, w1, b1, w2, b2, _domain=TOKEN_MOE_NODE.domain,
                               _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, y, **_):
        self.model = context.model
        act = y.producer().attributes.get("activation")
        return top_level(context) and act is not None and act.value in ORT_ACTIVATIONS

    def rewrite(self, op, hidden, logits, w1, b1, w2, b2, y):
        import onnx_ir as ir

        node = y.producer()
        attrs = {k: a.value for k, a in node.attributes.items()}
        p = f"auto_moe_{self.count}_"
        self.count += 1
        base = attrs["routing"] == "base"

        def out(name: str) -> ir.Value:
            return ir.Value(name=p + name, type=ir.TensorType(ir.DataType(self.elem)))

        inputs = [hidden, logits, w1, b1, w2, b2]
        moe = ir.Node(MSFT_DOMAIN, "MoE", inputs, outputs=[out("moe" if base else "y")],
                      attributes=[ir.AttrInt64("k", int(attrs["k"])),
                                  ir.AttrString("activation_type", ORT_ACTIVATIONS[attrs["activation"]]),
                                  ir.AttrInt64("normalize_routing_weights", 1)])
        fused = [moe]
        if base:  # k = 1 renormalised is 1; Base Layers' gate is sigmoid(max logit)
            axes = ir.Node("", "Constant", [], outputs=[ir.Value(name=p + "axes")],
                           attributes=[ir.AttrInt64s("value_ints", [-1])])
            top = ir.Node("", "ReduceMax", [logits, axes.outputs[0]], outputs=[ir.Value(name=p + "top")],
                          attributes=[ir.AttrInt64("keepdims", 1)])
            gate = ir.Node("", "Sigmoid", [top.outputs[0]], outputs=[ir.Value(name=p + "gate")])
            fused += [axes, top, gate, ir.Node("", "Mul", [moe.outputs[0], gate.outputs[0]], outputs=[out("y")])]
        loop = ir.Node(node.domain, node.op_type, inputs, outputs=[out("y")],
                       attributes=list(node.attributes.values()))
        n = op.Shape(hidden, start=0, end=1, _outputs=[p + "n"])
        cap = op.Constant(value_ints=[self.max_tokens], _outputs=[p + "max"])
        cond = op.Squeeze(op.LessOrEqual(n, cap, _outputs=[p + "le"]), _outputs=[p + "cond"])
        self.model.opset_imports.setdefault(MSFT_DOMAIN, 1)
        return op.If(cond, then_branch=ir.Graph([], [fused[-1].outputs[0]], nodes=fused, name=p + "fused"),
                     else_branch=ir.Graph([], loop.outputs, nodes=[loop], name=p + "loop"))
