"""The one trace-and-finish path of every graph an export writes (model.onnx, decode.onnx,
decode_seq.onnx).

``trace(module, args, dynamic_shapes, ...)``: ``torch.export`` + the dynamo ONNX exporter with the
target's translation table; ``module`` is a meta twin (``weights.meta_twin``), traced without data:
small initializers are read from ``source`` and large ones stay placeholders (``weights.py``).

``finish(proto, model, ...)``: the same steps, in the same order, for every graph:

1. the target's rewrites that need the smlp nodes (``rewrites.before_inline``);
2. the smlp nodes' model-local standard-op bodies (the exporter cannot emit functions), inlined
   for ``ort`` / ``portable``;
3. the target's rewrites of the standard-op graph (``rewrites.after_inline``);
4. unused opset imports dropped; exporter metadata (stack traces, module scopes) stripped after the
   probes (``probes.py``) were read from it; the export's own metadata (``metadata.py``) added;
   the exporter's symbolic dims ``s0, s1, ...`` renamed after ``dim_names``; the IR version set.

The graphs differ only in what the parameters say: their dims' names, whether the token-MoE
expert loop is unrolled, and which rewrites run (``rewrites.Rewrites``).
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import onnx
import onnx.inliner

from . import contract
from .functions import functions_for, onnx_elem_type
from .weights import _all_graphs


def twin(model, dtype: str):
    """(the module to trace, its weight source): ``model``'s meta twin (no data; ``weights.py``)
    in ``dtype``'s mixed precision (LayerNorms + routers fp32; ``precision.py``)."""
    from ..precision import to_compute_dtype
    from .weights import meta_twin, source_for

    return to_compute_dtype(meta_twin(model), dtype), source_for(model)


def trace(module, args: tuple, dynamic_shapes: Any, *, opset: int, table: dict,
          input_names: list[str], output_names: list[str], source=None) -> onnx.ModelProto:
    """torch.export + torch.onnx.export(dynamo=True) with the smlp translation ``table``, with the
    exporter's progress chatter silenced.

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


def finish(proto: onnx.ModelProto, model, *, target: str, dtype: str, opset: int, ir_version: int,
           dim_names: tuple[str, ...], unroll_experts: bool, empty_docs: bool, rewrites=None) -> onnx.ModelProto:
    """The finished graph of a traced ``proto`` (see the module docstring); ``model`` is the
    SMLPForCausalLM it was traced from (config, checkpoint facts for the metadata).

    ``dim_names``: names of the dynamic axes of the first input, in order (the exporter's
    ``s0, s1, ...`` are renamed everywhere). ``unroll_experts``: the token-MoE body writes its
    expert loop out (``functions.functions_for``). ``empty_docs``: write an empty ``doc_string``
    on every graph, graph input / output / value_info and subgraph node (model.onnx always had
    them, the decode step graphs only on top-level nodes: kept so that the files stay
    byte-identical). ``rewrites``: a ``rewrites.Rewrites`` (None:
    none)."""
    elem = onnx_elem_type(dtype)
    if rewrites is not None:
        proto = rewrites.before_inline(proto, elem=elem, opset=opset)
    ops = {n.op_type for g in _all_graphs(proto.graph) for n in g.node if n.domain == contract.DOMAIN}
    proto.functions.extend(functions_for(model.config, elem=elem, opset=opset, op_types=ops, unroll=unroll_experts))
    if target in ("ort", "portable"):
        proto = onnx.inliner.inline_local_functions(proto)
        del proto.functions[:]
    if rewrites is not None:
        proto = rewrites.after_inline(proto)
    _drop_unused_opsets(proto)
    from .probes import attach_probes, find_probes

    probes = find_probes(proto)  # before _clean drops the module scopes it reads
    _clean(proto, empty_docs)
    attach_probes(proto, probes)
    from .metadata import attach_metadata

    attach_metadata(proto, model)  # checkpoint sha256, config, producer (deterministic)
    _rename_dims(proto, dim_names)
    proto.ir_version = ir_version  # ONNX Runtime 1.31 refuses IR > 13
    return proto


def _clean(model: onnx.ModelProto, empty_docs: bool) -> None:
    """Drop exporter metadata (stack traces, original node names): noise, and not reproducible."""
    del model.metadata_props[:]
    for g in _all_graphs(model.graph):
        if empty_docs:
            g.doc_string = ""
        for n in g.node:
            del n.metadata_props[:]
            if empty_docs or g is model.graph:
                n.doc_string = ""
        for vi in (*g.input, *g.output, *g.value_info):
            del vi.metadata_props[:]
            if empty_docs:
                vi.doc_string = ""
        for t in g.initializer:
            del t.metadata_props[:]


def _rename_dims(model: onnx.ModelProto, names: tuple[str, ...]) -> None:
    """The exporter names the dynamic axes s0, s1, ...; call those of the first input ``names``."""
    inp = model.graph.input[0].type.tensor_type.shape.dim
    mapping = {inp[i].dim_param: names[i] for i in range(len(names)) if inp[i].dim_param}
    for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param in mapping:
                    d.dim_param = mapping[d.dim_param]


def _drop_unused_opsets(model: onnx.ModelProto) -> None:
    used = {n.domain for g in _all_graphs(model.graph) for n in g.node}
    used |= {n.domain for f in model.functions for n in f.node}
    keep = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)


__all__ = ["twin", "trace", "finish"]
