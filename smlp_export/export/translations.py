"""Custom translations of the ``torch.ops.smlp.*`` ops for ``torch.onnx.export(dynamo=True)``.

``translation_table(target, dtype, opset)`` is the ``custom_translation_table`` for one target:

- every target first lowers each MoE op to ONE ``smlp``-domain node named by its contract
  (``contract.py``), carrying ``plugin_namespace`` / ``plugin_version`` and the contract's fields;
- ``ort``: token MoE becomes ONNX Runtime's fused ``com.microsoft.MoE`` instead (raw router logits
  in, fc1 [E, f, d] / fc2 [E, d, f], ``normalize_routing_weights=1`` = softmax over the top k;
  Base-Layers top-1 maps with k = 1, whose renormalised weight is 1, times ``sigmoid(max logit)``
  applied outside the node). An erf-GELU expert has no ORT activation (ORT's "gelu" is the tanh
  form), so such a layer keeps the smlp node and is inlined like ``portable``;
- the pipeline then keeps the smlp nodes + local functions (``tensorrt``) or inlines the
  functions (``ort``, ``portable``); see ``pipeline.py``.

The exporter only accepts custom-domain nodes whose ONNX schema is registered, so importing this
module registers schemas for the smlp contracts and for com.microsoft.MoE (once per process; a
schema somebody else registered first is kept, never overwritten).
"""
from __future__ import annotations

from typing import Any, Callable

from onnx import defs

from . import contract
from .functions import TOKEN_MOE_NODE

TARGETS = ("ort", "tensorrt", "portable")
DTYPES = ("fp32", "fp16", "bf16")
MIN_OPSET = 18  # LayerNormalization (17) and Reduce*/Split with axes as inputs (18)
MSFT_DOMAIN = "com.microsoft"
# model expert activation -> com.microsoft.MoE activation_type (ORT's "gelu" is tanh-approximated)
ORT_ACTIVATIONS = {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"}

_A = defs.OpSchema.AttrType
_ATTR_TYPES = {int: _A.INT, float: _A.FLOAT, str: _A.STRING}
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _register(schema: defs.OpSchema) -> None:
    if not defs.has(schema.name, schema.domain):
        defs.register_schema(schema)


def _contract_schema(c: contract.PluginContract) -> defs.OpSchema:
    attrs = [defs.OpSchema.Attribute(n, _ATTR_TYPES[t], f"plugin field {n}") for n, t in c.attributes.items()]
    attrs += [defs.OpSchema.Attribute(n, _ATTR_TYPES[t], f"read by the fallback function only: {n}")
              for n, t in c.fallback_attributes.items()]
    attrs += [defs.OpSchema.Attribute(n, _A.STRING, "TensorRT plugin lookup") for n in ("plugin_namespace", "plugin_version")]
    return defs.OpSchema(
        c.op_type, c.domain, 1, doc=f"lowered from {c.torch_op}",
        inputs=[defs.OpSchema.FormalParameter(n, "I" if n in c.int_inputs else "T") for n in c.inputs],
        outputs=[defs.OpSchema.FormalParameter(n, "T") for n in c.outputs],
        type_constraints=[("T", _FLOATS, "float tensors")]
        + ([("I", ["tensor(int32)"], "index tensors")] if c.int_inputs else []),
        attributes=attrs,
    )


def register_schemas() -> None:
    for c in (*contract.CONTRACTS.values(), TOKEN_MOE_NODE):
        _register(_contract_schema(c))
    P = defs.OpSchema.FormalParameter
    _register(defs.OpSchema(
        "MoE", MSFT_DOMAIN, 1, doc="ONNX Runtime contrib op (subset of its inputs used here)",
        inputs=[P("input", "T"), P("router_probs", "T"), P("fc1_experts_weights", "T"),
                P("fc1_experts_bias", "T"), P("fc2_experts_weights", "T"), P("fc2_experts_bias", "T")],
        outputs=[P("output", "T")],
        type_constraints=[("T", _FLOATS, "float tensors")],
        attributes=[defs.OpSchema.Attribute("k", _A.INT, "experts per token"),
                    defs.OpSchema.Attribute("activation_type", _A.STRING, "relu|gelu|silu|identity"),
                    defs.OpSchema.Attribute("normalize_routing_weights", _A.INT, "softmax over the top k")],
    ))


register_schemas()


def _plugin_attrs(c: contract.PluginContract) -> dict[str, Any]:
    return {"plugin_namespace": c.namespace, "plugin_version": c.version}


def _opsets(opset: int):
    import onnxscript

    return (onnxscript.values.Opset("", opset), onnxscript.values.Opset(contract.DOMAIN, 1),
            onnxscript.values.Opset(MSFT_DOMAIN, 1))


def _num_experts(weight: Any) -> int:
    """Static expert count from the exporter's symbolic value (weights are initializers)."""
    return int(weight.shape[0])


ORT_MOE_IMPLS = ("auto", "fused", "loop")
# "auto": token count at or below which the fused com.microsoft.MoE runs, above it the Loop
# formulation (an If node in the graph picks per call). Measured on ORT 1.31 CPU, default model,
# whole graph, 1 thread, B = 1 (docs/export.md): the written-out expert formulation with
# FastGelu ties the fused node at 1 token and beats it from 8 tokens on, so "loop" is the
# export default and "auto" only sends the smallest calls to the fused node.
AUTO_FUSED_MAX_TOKENS = 4


def translation_table(target: str, dtype: str = "fp32", opset: int = MIN_OPSET, *,
                      ort_moe: str = "fused") -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``.

    Maps ``torch.ops.smlp.{token_moe,spatial_moe,spatial_moe_partial}.default`` to functions that
    emit the target's nodes. ``dtype`` is accepted for symmetry with the pipeline (the emitted nodes
    are type-polymorphic). ``ort_moe`` (ort target only): "fused" = com.microsoft.MoE where it
    maps, "loop" = the portable sort + Loop formulation (measured faster on CPU for large token
    counts, slower for a few tokens; docs/export.md), "auto" = the smlp node, which
    ``graph.build_onnx`` turns into an If choosing fused or loop by token count. Reused by the decode-graph exporter.
    """
    import torch

    import smlp_export.ops  # noqa: F401  (registers torch.ops.smlp.*)

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    if ort_moe not in ORT_MOE_IMPLS:
        raise ValueError(f"unknown ort_moe {ort_moe!r}")
    op, smlp, msft = _opsets(opset)
    TM, SM, SP = TOKEN_MOE_NODE, contract.SPATIAL_MOE, contract.SPATIAL_MOE_PARTIAL

    def token_moe_node(hidden, router_logits, w1, b1, w2, b2, routing: str, k: int, activation: str):
        # exporter-internal node (no plugin_namespace: it is inlined or lowered before saving)
        return getattr(smlp, TM.op_type)(hidden, router_logits, w1, b1, w2, b2, routing=routing, k=k,
                                         activation=activation)

    def token_moe_ort(hidden, router_logits, w1, b1, w2, b2, routing: str, k: int, activation: str):
        if activation not in ORT_ACTIVATIONS:
            return token_moe_node(hidden, router_logits, w1, b1, w2, b2, routing, k, activation)
        y = msft.MoE(hidden, router_logits, w1, b1, w2, b2, k=k,
                     activation_type=ORT_ACTIVATIONS[activation], normalize_routing_weights=1)
        if routing == "base":
            # k = 1 renormalised gives weight 1; Base Layers' gate is sigmoid(chosen affinity).
            top = op.ReduceMax(router_logits, op.Constant(value_ints=[-1]), keepdims=1)
            y = op.Mul(y, op.Sigmoid(top))
        return y

    def spatial_moe(z2, weight, bias):
        return getattr(smlp, SM.op_type)(z2, weight, bias, num_experts=_num_experts(weight), **_plugin_attrs(SM))

    def spatial_moe_partial(z2, weight, bias, router_weight):
        return getattr(smlp, SP.op_type)(z2, weight, bias, router_weight, num_experts=_num_experts(weight),
                                         prefix=int(router_weight.shape[0]), **_plugin_attrs(SP))

    return {
        # "auto" emits the smlp node; build_onnx wraps it in If(tokens <= N, fused, loop).
        torch.ops.smlp.token_moe.default: token_moe_ort if (target, ort_moe) == ("ort", "fused") else token_moe_node,
        torch.ops.smlp.spatial_moe.default: spatial_moe,
        torch.ops.smlp.spatial_moe_partial.default: spatial_moe_partial,
    }
