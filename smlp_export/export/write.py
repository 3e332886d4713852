"""Writing an export: graphs + weights + manifest into a folder, and nothing else.

``write_export`` traces the model, writes model.onnx (and, with ``decode``, decode.onnx and
decode_seq.onnx) through ``weights.save_graph`` and then manifest.json (``artifacts.Manifest``).
It validates nothing and publishes nothing: that is ``pipeline.export_model``, the one
orchestration above this layer and the validation layer (docs/architecture.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..artifacts import DECODE_FILE, MODEL_FILE, SEQ_FILE, Manifest, checkpoint_record, file_entry

IR_VERSION = 10  # ONNX Runtime 1.31 refuses IR > 13; 10 is what onnx 1.16+ readers all take


def _tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    import smlp_export

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__, "smlp_export": smlp_export.__version__}


def _checkpoint_entry(model, checkpoint: Any, out: Path) -> dict[str, Any]:
    """checkpoint: what the user named (path, "default"/None) or the in-memory model itself."""
    from ..checkpoint import DEFAULT_NAME

    info = getattr(model, "checkpoint_info", None) or {}
    path = info.get("path")
    if checkpoint is model:
        name = Path(path).name if path else "in-memory"
    elif checkpoint is None or str(checkpoint) == DEFAULT_NAME:
        name = DEFAULT_NAME
    else:
        name = Path(str(path or checkpoint)).name
    return checkpoint_record(path, name, info.get("weights_sha256"), out)


def build_manifest(model, proto, *, target: str, dtype: str, opset: int, checkpoint: Any, out: Path,
                   files: list[dict[str, Any]], ort_moe: str = "fused") -> Manifest:
    """manifest.json: what the file is, what it expects and what made it (keys read by others)."""
    from .graph import io_spec, routing_layout

    cfg = model.config
    inputs, outputs = io_spec(proto)
    routing = {}
    for name, kind in routing_layout(model):
        if kind == "tmoe_logits":
            routing[name] = {"output": f"router.{name}", "kind": kind, "routing": cfg.token_routing, "k": cfg.top_k}
        else:
            routing[name] = {"output": f"router.{name}", "kind": kind, "routing": cfg.spatial_routing, "k": 1}
    return Manifest(
        target=target, opset=opset, dtype=dtype,
        # ort target: how token MoE is expressed ("auto" = If(few tokens: fused com.microsoft.MoE,
        # else loop), "fused" or "loop"); else null
        ort_moe=ort_moe if target == "ort" else None,
        # fp16 graphs compute in float16 and cast every output to float32 at the end.
        output_dtype="float32", ir_version=int(proto.ir_version), inputs=inputs, outputs=outputs,
        routing_outputs=routing, max_seq_len=cfg.max_seq_len,
        custom_domains=sorted({o.domain for o in proto.opset_import if o.domain not in ("", "ai.onnx")}),
        checkpoint=_checkpoint_entry(model, checkpoint, out), config=cfg.to_dict(),
        tool_versions=_tool_versions(), files=files, decode=None, dir=out)


def write_export(model, directory: Path, *, out: Path, checkpoint: Any, target: str, dtype: str, opset: int,
                 ort_moe: str, decode: bool, scheme=None, stage: Callable[[str], None] = lambda s: None):
    """Write the export of ``model`` into ``directory`` (which will be renamed to ``out``: the
    manifest records the checkpoint relative to ``out``). ``scheme``: a
    ``smlp_export.quantize.QuantScheme`` applied to every graph's weights, or None. ``stage(name)``
    is called as each stage starts. Returns (manifest, the model.onnx ModelProto)."""
    from .graph import build_onnx
    from .weights import save_graph, source_for

    source = source_for(model)  # build_onnx traces a meta twin; save reads the weights from here
    stage("trace + translate")
    proto = build_onnx(model, target=target, dtype=dtype, opset=opset, ir_version=IR_VERSION, ort_moe=ort_moe,
                       lazy=True)
    quantized = None
    if scheme is not None:
        from ..quantize import quantize_graph

        quantized = quantize_graph(proto, source, scheme, target)
    stage("save")
    names = save_graph(proto, directory / MODEL_FILE, source, full_check=True)
    stage("check")
    manifest = build_manifest(model, proto, target=target, dtype=dtype, opset=opset, checkpoint=checkpoint,
                              out=out, files=[file_entry(directory, n) for n in names], ort_moe=ort_moe)
    if scheme is not None:
        from ..quantize import manifest_entry

        manifest.quantization = manifest_entry(scheme, quantized, model)
    if decode:
        stage("decode graph")
        from ..decode.export import export_decode_graph
        from ..decode.sequence_export import export_sequence_graph

        dec = manifest.decode = export_decode_graph(model, directory / DECODE_FILE, target=target, dtype=dtype,
                                                    opset=opset, quantize=scheme)
        # the per-row-position twin for Triton's sequence batcher (decode/sequence_export.py)
        seq = dec["sequence"] = export_sequence_graph(model, directory / SEQ_FILE, target=target, dtype=dtype,
                                                      opset=opset, quantize=scheme)
        for section in (dec, seq):
            manifest.add_files(directory, [section["file"]] + ([section["data_file"]] if "data_file" in section else []))
    manifest.write(directory)
    return manifest, proto
