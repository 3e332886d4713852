"""The node contract shared by the ONNX exporter (``--target tensorrt``) and the TensorRT plugins.

Each MoE custom op becomes ONE ONNX node in the ``smlp`` domain whose ``op_type`` is the TensorRT
plugin's name; it carries ``plugin_namespace`` / ``plugin_version`` string attributes (TensorRT's
ONNX parser uses them to pick the plugin over the model-local fallback function) plus the typed
fields below, which match the plugin creator's fields by name. The exporter writes nodes from this
table; plugins/ read their names, inputs and fields from it: one place, both sides.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DOMAIN = "smlp"
PLUGIN_NAMESPACE = "smlp"
PLUGIN_VERSION = "1"


@dataclass(frozen=True)
class PluginContract:
    op_type: str  # ONNX op_type == TensorRT plugin name
    torch_op: str  # qualified torch.library name it lowers from
    inputs: tuple[str, ...]  # positional, with shapes in the docstring of the torch op
    outputs: tuple[str, ...]
    attributes: dict[str, type] = field(default_factory=dict)  # field name -> int | float | str
    int_inputs: tuple[str, ...] = ()  # inputs that are int32 index tensors (all others: float)
    # Node attributes only the model-local fallback function reads, never plugin fields: TensorRT's
    # parser hands a plugin only the fields its creator declares (onnx-tensorrt loadFields).
    fallback_attributes: dict[str, type] = field(default_factory=dict)
    domain: str = DOMAIN
    namespace: str = PLUGIN_NAMESPACE
    version: str = PLUGIN_VERSION

    @property
    def qualified_name(self) -> str:
        """``namespace::name`` as tensorrt.plugin registers it."""
        return f"{self.namespace}::{self.op_type}"


SPATIAL_MOE = PluginContract(
    op_type="SMLPSpatialMoE",
    torch_op="smlp::spatial_moe",
    # z2 [B, T, c], weight [E, n, n] (lower triangle of [:T, :T] used), bias [E, n]
    inputs=("z2", "weight", "bias"),
    outputs=("output",),  # [B, T, c]
    attributes={"num_experts": int},
)

SPATIAL_MOE_PARTIAL = PluginContract(
    op_type="SMLPSpatialMoEPartial",
    torch_op="smlp::spatial_moe_partial",
    # z2 [B, T, c], weight [E, n, n], bias [E, n], router_weight [p, E]
    inputs=("z2", "weight", "bias", "router_weight"),
    outputs=("output",),  # [B, T, c]
    attributes={"num_experts": int, "prefix": int},
)

# The grouped-GEMM plugin (issue 9): the tensorrt target's token MoE is routing + permutation in
# standard ONNX ops around two of these nodes (up-projection with the activation fused, then the
# down-projection), so the plugin only ever sees rows already grouped by expert. (There is no
# token-MoE plugin: ``smlp::token_moe`` is an exporter-internal node, ``functions.TOKEN_MOE_NODE``.)
GROUPED_EXPERT_GEMM = PluginContract(
    op_type="SMLPGroupedExpertGemm",
    torch_op="smlp::grouped_expert_gemm",
    # x [M, K] rows grouped by expert; offsets [E + 1] int32 (rows of expert e are
    # offsets[e]:offsets[e+1], offsets[0] = 0, offsets[E] = M); weight [E, N, K]; bias [E, N]
    inputs=("x", "offsets", "weight", "bias"),
    outputs=("output",),  # [M, N] = act(x @ weight[e]^T + bias[e]) row by row
    attributes={"activation": str},  # identity | gelu | gelu_tanh | relu | silu
    int_inputs=("offsets",),
    # ops.grouped_gemm.GEMM_ACTIVATIONS.index(activation): the fallback body picks the activation
    # with If nodes on this number, as TensorRT parses no string ops (Constant value_string,
    # ai.onnx.ml.LabelEncoder) when it inlines the body.
    fallback_attributes={"activation_index": int},
)

CONTRACTS: dict[str, PluginContract] = {}


def register(c: PluginContract) -> PluginContract:
    """Add a contract; refuses duplicates and malformed names (registrations never overwrite)."""
    if not c.op_type.isidentifier() or "::" not in c.torch_op:
        raise ValueError(f"malformed contract {c.op_type!r} / {c.torch_op!r}")
    if c.op_type in CONTRACTS or any(x.torch_op == c.torch_op for x in CONTRACTS.values()):
        raise ValueError(f"duplicate plugin contract {c.op_type} ({c.torch_op})")
    if set(c.attributes) & set(c.fallback_attributes):
        raise ValueError(f"{c.op_type}: a fallback attribute cannot also be a plugin field")
    for name, t in {**c.attributes, **c.fallback_attributes}.items():
        if t not in (int, float, str):
            raise ValueError(f"{c.op_type}.{name}: attribute type must be int, float or str")
    CONTRACTS[c.op_type] = c
    return c


for _c in (SPATIAL_MOE, SPATIAL_MOE_PARTIAL, GROUPED_EXPERT_GEMM):
    register(_c)


def by_torch_op(qualified: str) -> PluginContract:
    for c in CONTRACTS.values():
        if c.torch_op == qualified:
            return c
    raise KeyError(qualified)
