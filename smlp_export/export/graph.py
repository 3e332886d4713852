"""Build the ONNX graph of an sMLP model for one target: torch.export -> dynamo ONNX -> finish.

``build_onnx(model, target=..., dtype=..., opset=...)`` returns an ``onnx.ModelProto`` with

- input ``input_ids`` int64 [batch, seq] (1 <= seq <= max_seq_len; both axes dynamic);
- output ``logits`` float32 [batch, seq, vocab] and the router outputs the validator compares:
  ``router.blocks.{i}.tmoe`` [batch, seq, E_t] (token-router logits) and, for partial spatial
  routing, ``router.blocks.{i}.smoe`` [batch, c, E_s] (channel-router probabilities), in block
  order. With ``dtype="fp16"`` / ``"bf16"`` the graph computes in that dtype, except LayerNorms and
  the routers (float32, ``smlp_export.precision``), and casts its outputs to float32 at the
  very end (one Cast per output): callers get one output type for every export, and downstream
  softmax / sampling over 257 logits does not run in half precision.

The graph is made deterministic (node metadata with stack traces stripped, symbolic dims renamed
to ``batch`` / ``seq``), so the same checkpoint and options give byte-identical files.
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import onnx
import onnx.inliner

from . import contract
from .functions import TOKEN_MOE_NODE, functions_for, onnx_elem_type
from .translations import AUTO_FUSED_MAX_TOKENS, MSFT_DOMAIN, ORT_ACTIVATIONS, translation_table
from .weights import _all_graphs

DIM_NAMES = ("batch", "seq")


def routing_layout(model) -> list[tuple[str, str]]:
    """[(layer name, kind)] of the model's router outputs, in output order (one tiny eager run)."""
    import torch

    routing: dict[str, Any] = {}
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long), routing)
    return [(name, "tmoe_logits" if name.endswith(".tmoe") else "smoe_probs") for name in routing]


class _Wrapper:
    """Built lazily (torch import) as an nn.Module returning (logits, *router outputs) in float32."""

    @staticmethod
    def make(model, names: list[str]):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: torch.Tensor):
                routing: dict[str, torch.Tensor] = {}
                logits = self.model(input_ids, routing)
                return (logits.float(), *[routing[n].float() for n in names])

        return Wrapped().eval()


def _trace(model, target: str, dtype: str, opset: int, names: list[str], ort_moe: str) -> onnx.ModelProto:
    """torch.export with dynamic batch/seq, then the dynamo ONNX exporter with our translations."""
    import torch

    from .weights import meta_twin, source_for

    cfg = model.config
    source = source_for(model)
    m = meta_twin(model)  # traced without data; weights come from `source` (weights.py)
    from ..precision import to_compute_dtype

    m = to_compute_dtype(m, dtype)  # fp16/bf16: mixed precision (LayerNorms + routers fp32)
    wrapped = _Wrapper.make(m, names)
    # T = 2 as the example: T = 1 would let torch specialise size-1 broadcasts.
    ids = torch.zeros(2, min(2, cfg.max_seq_len), dtype=torch.long)
    # Dim.DYNAMIC, not Dim("seq", max=n): slicing W[:T, :T] makes torch guard T != n, which a
    # bounded Dim rejects; the ONNX Slice it becomes is correct for every 1 <= T <= n.
    dyn = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    return dynamo_export(wrapped, (ids,), (dyn,), opset=opset,
                         table=translation_table(target, dtype, opset, ort_moe=ort_moe),
                         input_names=["input_ids"], output_names=["logits", *[f"router.{n}" for n in names]],
                         source=source)


def dynamo_export(module, args: tuple, dynamic_shapes: Any, *, opset: int, table: dict,
                  input_names: list[str], output_names: list[str], source=None) -> onnx.ModelProto:
    """torch.export + torch.onnx.export(dynamo=True) with the smlp translation table, with the
    exporter's progress chatter silenced (shared by model.onnx and decode.onnx).

    ``source`` (a ``weights.WeightSource``): ``module`` holds meta tensors, traced without data;
    small initializers are read from ``source`` and large ones stay placeholders (``weights.py``),
    with the exporter's optimisation (constant folding, fusions) run here so that it never reads
    a placeholder."""
    import torch

    quiet = io.StringIO()
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(quiet):
            ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
            program = torch.onnx.export(
                ep, args, dynamo=True, opset_version=opset, optimize=source is None, verbose=False,
                custom_translation_table=table, input_names=input_names, output_names=output_names,
            )
            if source is not None:
                return _optimize_lazy(program.model, source)
    finally:
        logger.setLevel(level)
    return program.model_proto


def _optimize_lazy(model, source) -> onnx.ModelProto:
    """What ``torch.onnx.export(optimize=True)`` runs (onnxscript's optimizer, then its ONNX
    fusions), after giving the meta-traced graph its weights, folding nothing that reads a
    placeholder."""
    import onnx_ir as ir
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    from . import weights

    recipes = weights.lazify_ir(model, source)
    onnxscript.optimizer.optimize_ir(model, should_fold=weights.should_fold(recipes))
    onnxscript.rewriter.onnx_fusions.fuse(model)
    proto = ir.serde.serialize_model(model)
    weights.finish_placeholders(proto, recipes)
    return proto


def _clean(model: onnx.ModelProto) -> None:
    """Drop exporter metadata (stack traces, original node names): noise, and not reproducible."""
    del model.metadata_props[:]
    for g in _all_graphs(model.graph):
        g.doc_string = ""
        for n in g.node:
            del n.metadata_props[:]
            n.doc_string = ""
        for vi in (*g.input, *g.output, *g.value_info):
            del vi.metadata_props[:]
            vi.doc_string = ""
        for t in g.initializer:
            del t.metadata_props[:]


def _rename_dims(model: onnx.ModelProto) -> None:
    """The exporter names the dynamic axes s0, s1, ...; call them batch and seq everywhere."""
    inp = model.graph.input[0].type.tensor_type.shape.dim
    mapping = {inp[i].dim_param: DIM_NAMES[i] for i in range(2) if inp[i].dim_param}
    for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param in mapping:
                    d.dim_param = mapping[d.dim_param]


def _smlp_op_types(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for g in _all_graphs(model.graph) for n in g.node if n.domain == contract.DOMAIN}


def _drop_unused_opsets(model: onnx.ModelProto) -> None:
    used = {n.domain for g in _all_graphs(model.graph) for n in g.node}
    used |= {n.domain for f in model.functions for n in f.node}
    keep = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)


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


def build_onnx(model, *, target: str, dtype: str, opset: int, ir_version: int = 10,
               ort_moe: str = "fused", causal_block: int | None = None, lazy: bool = False) -> onnx.ModelProto:
    """The finished, checked-ready ONNX model of ``model`` (an SMLPForCausalLM in eval mode).

    ``ort_moe`` (ort target): "fused" com.microsoft.MoE, "loop" (the portable formulation) or
    "auto" (an If per layer: fused for at most ``AUTO_FUSED_MAX_TOKENS`` tokens, else loop).
    ``causal_block`` (ort / portable): rows per block of the blocked-causal spatial products
    (``blocked_causal.py``); 0 = dense products, None = ``default_block(max_seq_len)``.
    ``lazy``: large initializers stay placeholders (``weights.py``) for ``weights.write_model``
    to fill from ``weights.source_for(model)`` one at a time; else they hold their data."""
    names = [n for n, _ in routing_layout(model)]
    proto = _trace(model, target, dtype, opset, names, ort_moe)
    if target == "ort" and ort_moe == "auto":
        _auto_token_moe(proto, onnx_elem_type(dtype))
    if target == "tensorrt":  # token MoE -> standard-op routing + two grouped-GEMM plugin nodes
        from .tensorrt_moe import finish_tensorrt

        finish_tensorrt(proto, elem=onnx_elem_type(dtype), opset=opset)
    ops = _smlp_op_types(proto)
    # Model-local standard-op bodies for the smlp nodes (the exporter cannot emit functions).
    proto.functions.extend(functions_for(model.config, elem=onnx_elem_type(dtype), opset=opset, op_types=ops,
                                         unroll=target == "ort"))
    if target in ("ort", "portable"):
        proto = onnx.inliner.inline_local_functions(proto)
        del proto.functions[:]
    if target == "ort":
        from .optimize import optimize_ort

        optimize_ort(proto)  # exact rewrites: pre-masked weights, fused GELU, split weights
    if target in ("ort", "portable"):
        from .blocked_causal import block_causal_matmuls, default_block

        n = model.config.max_seq_len
        block_causal_matmuls(proto, n, default_block(n) if causal_block is None else causal_block)
    _drop_unused_opsets(proto)
    from .probes import attach_probes, find_probes

    probes = find_probes(proto)  # before _clean drops the module scopes it reads
    _clean(proto)
    attach_probes(proto, probes)
    from .metadata import attach_metadata

    attach_metadata(proto, model)  # checkpoint sha256, config, producer (deterministic)
    _rename_dims(proto)
    proto.ir_version = ir_version  # ONNX Runtime 1.31 refuses IR > 13
    if not lazy:
        from .weights import materialize, source_for

        materialize(proto, source_for(model))
    return proto


def node_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Top-level nodes by ``domain::op_type`` (default domain shown bare), most frequent first."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        key = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def io_spec(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """Graph inputs/outputs as manifest entries: {name, dtype, shape: ["batch", "seq", 257]}."""
    def entry(vi: onnx.ValueInfoProto) -> dict:
        tt = vi.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": shape}

    return [entry(v) for v in model.graph.input], [entry(v) for v in model.graph.output]
