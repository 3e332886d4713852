"""``export_model``: checkpoint -> OUT/{model.onnx, manifest.json, parity.json}, atomically.

Stages: load -> trace (torch.export) -> translate (dynamo ONNX + smlp translations) -> check
(onnx.checker full check) -> save -> [decode graph] -> validate (``smlp_export.validate``) ->
publish. Everything is written into a temporary sibling of OUT that is renamed into place only
when every stage passed, so an OUT that exists is complete. A parity failure moves the temporary
directory to ``OUT.failed`` (for inspection) and raises ``ExportError``.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import SMLPError
from .translations import DTYPES, MIN_OPSET, ORT_MOE_IMPLS, TARGETS
from ..fsutil import sha256_file as _sha256

MANIFEST_FORMAT = 1
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
PARITY_FILE = "parity.json"
DECODE_FILE = "decode.onnx"
IR_VERSION = 10  # ONNX Runtime 1.31 refuses IR > 13; 10 is what onnx 1.16+ readers all take
# Weights above this go to model.onnx.data (written one tensor at a time, never all in memory);
# below it they are embedded in model.onnx (one file; at most 2x this in memory while saving).
EXTERNAL_DATA_THRESHOLD = 128 * 1024**2
DEFAULT_OPSET = 18


class ExportError(SMLPError):
    """An export that cannot be done as asked (bad option, existing output, failed parity)."""


def max_opset() -> int:
    import onnx.defs

    return onnx.defs.onnx_opset_version()


def check_options(target: str, dtype: str | None, opset: int, ort_moe: str = "auto", quantize: str | None = None,
                  block_size: int | None = None):
    """One clear error per bad option, before anything heavy runs (dtype None: the checkpoint's);
    returns the quantization scheme or None."""
    if ort_moe not in ORT_MOE_IMPLS:
        raise ExportError(f"unknown --ort-moe {ort_moe!r}; choose one of {', '.join(ORT_MOE_IMPLS)}")
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "bf16" and target == "ort" and ort_moe == "fused":
        raise ExportError("--ort-moe fused cannot be used with --dtype bf16: ONNX Runtime's "
                          "com.microsoft.MoE has no bfloat16 CPU kernel (use loop or auto)")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: the export needs opset >= {MIN_OPSET} "
                          "(LayerNormalization, Reduce*/Split with axes inputs)")
    if opset > max_opset():
        raise ExportError(f"opset {opset} is newer than this onnx package supports ({max_opset()})")
    if quantize is None:
        if block_size is not None:
            raise ExportError("--block-size needs --quantize int8|int4")
        return None
    from ..quantize import QuantScheme, check_request

    scheme = QuantScheme.make(quantize, block_size)
    check_request(scheme, target=target, dtype=dtype, opset=opset)
    return scheme


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict[str, Any]
    node_counts: dict[str, int]
    model_bytes: int
    seconds: float
    parity: str  # "passed" | "failed" | "skipped (...)"
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    import smlp_export

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__, "smlp_export": smlp_export.__version__}


def _checkpoint_entry(model, checkpoint: Any) -> dict[str, Any]:
    """checkpoint: what the user named (path, "default"/None) or the in-memory model itself."""
    from ..checkpoint import DEFAULT_NAME

    info = getattr(model, "checkpoint_info", None) or {}
    path = str(Path(info["path"]).resolve()) if info.get("path") else None
    if checkpoint is model:
        name = Path(path).name if path else "in-memory"
    elif checkpoint is None or str(checkpoint) == DEFAULT_NAME:
        name = DEFAULT_NAME
    else:
        name = Path(str(path or checkpoint)).name
    return {"path": path, "weights_sha256": info.get("weights_sha256"), "name": name}


def build_manifest(model, proto, *, target: str, dtype: str, opset: int, checkpoint: Any,
                   files: list[dict[str, Any]], ort_moe: str = "fused") -> dict[str, Any]:
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
    return {
        "format_version": MANIFEST_FORMAT,
        "target": target,
        "opset": opset,
        "dtype": dtype,
        # ort target: how token MoE is expressed ("auto" = If(few tokens: fused com.microsoft.MoE,
        # else loop), "fused" or "loop"); else null
        "ort_moe": ort_moe if target == "ort" else None,
        # fp16 graphs compute in float16 and cast every output to float32 at the end.
        "output_dtype": "float32",
        "ir_version": int(proto.ir_version),
        "inputs": inputs,
        "outputs": outputs,
        "routing_outputs": routing,
        "max_seq_len": cfg.max_seq_len,
        "custom_domains": sorted({o.domain for o in proto.opset_import if o.domain not in ("", "ai.onnx")}),
        "checkpoint": _checkpoint_entry(model, checkpoint),
        "config": cfg.to_dict(),
        "tool_versions": _tool_versions(),
        "files": files,
        "decode": None,
    }


def _save(proto, directory: Path, source) -> list[dict[str, Any]]:
    """Write model.onnx (+ model.onnx.data for large weights), computing each placeholder
    weight from ``source`` one tensor at a time (``weights.write_model``); return the file entries."""
    from .weights import lazy_bytes, write_model

    big = lazy_bytes(proto) > EXTERNAL_DATA_THRESHOLD
    names = write_model(proto, directory / MODEL_FILE, source, external=big, data_name=DATA_FILE)
    return [{"name": n, "bytes": (directory / n).stat().st_size, "sha256": _sha256(directory / n)} for n in names]


def _validate(tmp: Path, checkpoint: Any, quick: bool, progress: bool = False) -> tuple[str, bool]:
    from ..precision import validation_backend
    from ..validate import run_validation

    manifest = json.loads((tmp / MANIFEST_FILE).read_text())
    report = run_validation(tmp, validation_backend(manifest["dtype"]), checkpoint=checkpoint, quick=quick,
                            progress=progress)
    return ("passed" if report.passed else "failed"), bool(report.passed)


def _checkpoint_dir(checkpoint: Any) -> Any:
    """The path export reads ``checkpoint`` from (the embedded model's folder for None / "default";
    None for an in-memory model)."""
    from ..checkpoint import resolve

    if checkpoint is None or isinstance(checkpoint, (str, os.PathLike)):
        return resolve(checkpoint)
    return None


def _publish(tmp: Path, out: Path, force: bool) -> None:
    from ..fsutil import publish_dir

    try:  # without --force this fails if OUT appeared since the check above (a concurrent export)
        publish_dir(tmp, out, overwrite=force)
    except FileExistsError:
        raise ExportError(f"{out} already exists: another export published it while this one ran "
                          "(use --force to replace it)") from None


def export_model(
    checkpoint: Any,
    out: str | os.PathLike,
    *,
    target: str = "ort",
    dtype: str | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    validate: bool = True,
    quick: bool = False,
    decode: bool = False,
    ort_moe: str = "auto",
    quantize: str | None = None,
    block_size: int | None = None,
    allow_pickle: bool = False,
    progress: Callable[[str], None] | None = None,
    validate_progress: bool = False,
) -> ExportResult:
    """Export a checkpoint (path, "default"/None, or a loaded SMLPForCausalLM) to ``out``.

    dtype: the graph's compute dtype; None (default): the checkpoint's own (a float16 checkpoint
    exports as fp16, LayerNorms and routers in float32; ``checkpoint.stored_dtype``), fp32 when quantizing.
    ``quantize`` "int8" | "int4" (``block_size`` 32 | 64 | 128): weight-only quantized graphs
    (``smlp_export.quantize``; the ort target then runs token MoE as QMoE for every token count).
    ``progress(stage)`` is called as each stage starts; ``validate_progress`` shows the validation's
    case counter on stderr. Raises ``ExportError`` / ``SMLPError``
    with a one-line message for anything the user can fix; ``out`` is only ever complete.
    """
    import onnx

    from .graph import build_onnx, node_counts

    scheme = check_options(target, dtype, opset, ort_moe, quantize, block_size)
    if dtype is None:
        from ..checkpoint import stored_dtype

        dtype = "fp32" if scheme is not None else stored_dtype(checkpoint)
    if scheme is not None and target == "ort":
        ort_moe = "fused"  # QMoE carries the quantized experts for every token count
    if dtype == "bf16" and ort_moe == "auto":
        ort_moe = "loop"  # com.microsoft.MoE has no bfloat16 CPU kernel (precision.py)
    from ..fsutil import check_output

    # --force replaces only an empty folder or one smlp wrote, never the checkpoint being exported
    out = check_output(out, force=force, inputs=[_checkpoint_dir(checkpoint)], error=ExportError)
    step = progress or (lambda stage: None)
    stages: dict[str, float] = {}
    t0 = last = time.perf_counter()

    def mark(stage: str) -> None:
        nonlocal last
        now = time.perf_counter()
        stages[stage] = round(now - last, 3)
        last = now

    step("load")
    if hasattr(checkpoint, "config") and hasattr(checkpoint, "forward"):
        model, in_memory = checkpoint, True
        model.eval()
    else:
        from .weights import open_checkpoint

        # the weights stay in the checkpoint file until save writes them (weights.py)
        model = open_checkpoint(checkpoint, allow_pickle=allow_pickle, dtype=dtype,
                                memory_op="export+validate" if validate else "export")
        in_memory = False
    from .weights import source_for

    source = source_for(model)  # build_onnx traces a meta twin; save reads the weights from here
    if scheme is not None:
        from ..quantize import check_model

        check_model(model, scheme, target=target)  # block size vs widths: before tracing
    mark("load")

    step("trace + translate")
    proto = build_onnx(model, target=target, dtype=dtype, opset=opset, ir_version=IR_VERSION, ort_moe=ort_moe,
                       lazy=True)
    quantized = None
    if scheme is not None:
        from ..quantize import quantize_graph

        quantized = quantize_graph(proto, source, scheme, target)
    mark("trace + translate")

    from ..fsutil import clean_stale, temp_dir_for

    clean_stale(out)  # .OUT.tmp-* / .OUT.old-* of earlier exports that were killed
    tmp = temp_dir_for(out)  # ordinary (umask) permissions, unlike mkdtemp's 0700
    try:
        step("save")
        files = _save(proto, tmp, source)
        mark("save")
        step("check")
        # checked from the file: the in-memory graph holds placeholders, the file holds the data
        onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        manifest = build_manifest(model, proto, target=target, dtype=dtype, opset=opset,
                                  checkpoint=checkpoint, files=files, ort_moe=ort_moe)
        if scheme is not None:
            from ..quantize import manifest_entry

            manifest["quantization"] = manifest_entry(scheme, quantized, model)
        mark("check")
        if decode:
            step("decode graph")
            from ..decode.export import export_decode_graph

            manifest["decode"] = export_decode_graph(model, tmp / DECODE_FILE, target=target, dtype=dtype, opset=opset,
                                                     quantize=scheme)
            # the per-row-position twin for Triton's sequence batcher (decode/sequence_export.py)
            from ..decode.sequence_export import SEQ_FILE, export_sequence_graph

            seq = manifest["decode"]["sequence"] = export_sequence_graph(model, tmp / SEQ_FILE, target=target,
                                                                         dtype=dtype, opset=opset, quantize=scheme)
            for name in [DECODE_FILE] + ([manifest["decode"]["data_file"]] if "data_file" in manifest["decode"] else []) + \
                    [SEQ_FILE] + ([seq["data_file"]] if "data_file" in seq else []):
                d = tmp / name
                manifest["files"].append({"name": name, "bytes": d.stat().st_size, "sha256": _sha256(d)})
            mark("decode graph")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        parity, ok = "skipped (--no-validate)", True
        if validate:
            step("validate")
            # the validator reloads the checkpoint by path; an in-memory model is passed as is
            parity, ok = _validate(tmp, model if in_memory else manifest["checkpoint"]["path"], quick,
                                   validate_progress)
            mark("validate")
        if not ok:
            failed = out.parent / f"{out.name}.failed"
            shutil.rmtree(failed, ignore_errors=True)
            os.rename(tmp, failed)
            raise ExportError(f"parity check failed; the export is kept for inspection in {failed} "
                              f"(see {failed / PARITY_FILE}); {out} was not written")
        step("publish")
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir=out, manifest=manifest, node_counts=node_counts(proto),
                        model_bytes=sum(f["bytes"] for f in files), seconds=time.perf_counter() - t0,
                        parity=parity, stage_seconds=stages)
