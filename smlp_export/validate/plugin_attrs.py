"""Plugin-node attributes against the checkpoint's config.

ONNX Runtime and the reference evaluator run the model-local fallback functions of the ``smlp``
plugin nodes, and those bodies are generated for the model (num_experts, prefix fixed by the
weights' shapes; the grouped GEMM's activation read from ``activation_index``): they never read
the plugin fields. TensorRT runs the plugin, which reads only the fields. So a wrong field passes
numeric parity and shows only on TensorRT.
``check_plugin_nodes`` compares every plugin node's fields, its fallback overload and the shapes
of its weight inputs with what the config implies, and returns one finding per item checked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from smlp_export.export import contract
from smlp_export.ops.grouped_gemm import GEMM_ACTIVATIONS

GEMM = "SMLPGroupedExpertGemm"


def _attrs(n: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in n.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _expected_fields(n: onnx.NodeProto, cfg, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The fields a node of this op_type must carry for ``cfg`` (besides namespace/version)."""
    if n.op_type == GEMM:
        w = shapes.get(n.input[2])
        # weight [E, N, K]: the up-projection maps d -> f_t (activation fused), the down-projection
        # f_t -> d (identity). The shape says which one this node is.
        up = w is not None and tuple(w[1:]) == (cfg.d_expert, cfg.d_model)
        act = cfg.expert_activation if up else "identity"
        # the fallback function reads activation_index, the plugin reads activation: they must agree
        return {"activation": act, "activation_index": GEMM_ACTIVATIONS.index(act)}
    if n.op_type == "SMLPSpatialMoE":
        return {"num_experts": cfg.n_spatial_experts}
    if n.op_type == "SMLPSpatialMoEPartial":
        return {"num_experts": cfg.n_spatial_experts, "prefix": cfg.prefix_len}
    return {}


def _expected_shapes(n: onnx.NodeProto, cfg) -> dict[int, list[tuple[int, ...]]]:
    """Input index -> acceptable shapes of the node's weight inputs."""
    E, d, f = cfg.n_token_experts, cfg.d_model, cfg.d_expert
    Es, T = cfg.n_spatial_experts, cfg.max_seq_len
    if n.op_type == GEMM:  # weight [E, N, K], bias [E, N]: up (f x d) or down (d x f)
        return {2: [(E, f, d), (E, d, f)], 3: [(E, f), (E, d)]}
    if n.op_type == "SMLPSpatialMoE":
        return {1: [(Es, T, T)], 2: [(Es, T)]}
    if n.op_type == "SMLPSpatialMoEPartial":
        return {1: [(Es, T, T)], 2: [(Es, T)], 3: [(cfg.prefix_len, Es)]}
    return {}


def _expected_counts(cfg, decode: bool) -> dict[str, int]:
    layers = len(cfg.sparse_layer_ids())
    if decode:  # decode.onnx: the spatial mixing of one new token is written in standard ops
        return {GEMM: 2 * layers}
    spatial = "SMLPSpatialMoEPartial" if cfg.spatial_routing == "partial" else "SMLPSpatialMoE"
    return {GEMM: 2 * layers, spatial: layers}


def check_plugin_nodes(model: onnx.ModelProto | str | Path, cfg, *, decode: bool = False) -> dict[str, Any]:
    """Check every plugin node (a node carrying ``plugin_namespace``, or any ``smlp``-domain node).

    Returns {"nodes": int, "checked": int, "passed": bool, "failures": [one line each],
    "findings": [{node, op_type, item, expected, got, ok}]}. ``model``: a ModelProto or a path
    (weights are read only for their shapes); ``decode``: the file is decode.onnx."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    findings: list[dict[str, Any]] = []

    def add(node: str, op: str, item: str, expected: Any, got: Any) -> None:
        findings.append({"node": node, "op_type": op, "item": item, "expected": expected, "got": got,
                         "ok": expected == got})

    nodes = [n for n in model.graph.node if n.domain == contract.DOMAIN or
             any(a.name == "plugin_namespace" for a in n.attribute)]
    counts: dict[str, int] = {}
    for i, n in enumerate(nodes):
        name = n.name or f"{n.op_type}#{i}"
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
        c = contract.CONTRACTS.get(n.op_type)
        if c is None:
            add(name, n.op_type, "op_type", "a plugin in smlp_export.export.contract", n.op_type)
            continue
        got = _attrs(n)
        add(name, n.op_type, "domain", c.domain, n.domain)
        add(name, n.op_type, "plugin_namespace", c.namespace, got.get("plugin_namespace"))
        add(name, n.op_type, "plugin_version", c.version, got.get("plugin_version"))
        add(name, n.op_type, "fields", sorted([*c.attributes, *c.fallback_attributes]),
            sorted(k for k in got if k not in ("plugin_namespace", "plugin_version")))
        for field, want in _expected_fields(n, cfg, shapes).items():
            add(name, n.op_type, field, want, got.get(field))
        for idx, allowed in _expected_shapes(n, cfg).items():
            inp = n.input[idx] if idx < len(n.input) else None
            shape = shapes.get(inp) if inp else None
            findings.append({"node": name, "op_type": n.op_type, "item": f"input {c.inputs[idx]} shape",
                             "expected": " or ".join("x".join(map(str, s)) for s in allowed),
                             "got": "x".join(map(str, shape)) if shape else f"{inp} (not an initializer)",
                             "ok": shape in allowed})
    for op, want in _expected_counts(cfg, decode).items():
        add("(graph)", op, "node count", want, counts.get(op, 0))
    failures = [f"plugin node {f['node']} ({f['op_type']}): {f['item']} is {f['got']!r}, the config implies "
                f"{f['expected']!r}" for f in findings if not f["ok"]]
    return {"nodes": len(nodes), "checked": len(findings), "passed": not failures, "failures": failures,
            "findings": findings}


__all__ = ["check_plugin_nodes"]
