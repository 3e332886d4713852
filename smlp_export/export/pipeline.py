"""``export_model``: checkpoint -> OUT/{model.onnx, manifest.json, parity.json}, atomically.

The one orchestration of an export, above both layers it calls: load -> write (``write.py``:
trace, translate, save + check the graphs, [decode graphs], manifest) -> validate
(``smlp_export.validate``) -> publish. Everything is written into a temporary sibling of OUT that
is renamed into place only when every stage passed, so an OUT that exists is complete. A parity
failure moves the temporary directory to ``OUT.failed`` (for inspection) and raises ``ExportError``.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..artifacts import MODEL_FILE, PARITY_FILE
from ..errors import SMLPError
from .translations import DTYPES, MIN_OPSET, ORT_MOE_IMPLS, TARGETS

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


def _validate(tmp: Path, checkpoint: Any, quick: bool, dtype: str, progress: bool = False) -> tuple[str, bool]:
    from ..precision import validation_backend
    from ..validate import run_validation

    report = run_validation(tmp, validation_backend(dtype), checkpoint=checkpoint, quick=quick, progress=progress)
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
    from .graph import node_counts

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
    current = ""

    def stage(name: str) -> None:
        """End the running stage (its seconds go to ``stage_seconds``) and start ``name``."""
        nonlocal last, current
        now = time.perf_counter()
        if current:
            stages[current] = round(now - last, 3)
        last, current = now, name
        if name:
            step(name)

    stage("load")
    if hasattr(checkpoint, "config") and hasattr(checkpoint, "forward"):
        model, in_memory = checkpoint, True
        model.eval()
    else:
        from .weights import open_checkpoint

        # the weights stay in the checkpoint file until save writes them (weights.py)
        model = open_checkpoint(checkpoint, allow_pickle=allow_pickle, dtype=dtype,
                                memory_op="export+validate" if validate else "export")
        in_memory = False
    if scheme is not None:
        from ..quantize import check_model

        check_model(model, scheme, target=target)  # block size vs widths: before tracing

    from ..fsutil import clean_stale, temp_dir_for
    from .write import write_export

    clean_stale(out)  # .OUT.tmp-* / .OUT.old-* of earlier exports that were killed
    tmp = temp_dir_for(out)  # ordinary (umask) permissions, unlike mkdtemp's 0700
    try:
        manifest, proto = write_export(model, tmp, out=out, checkpoint=checkpoint, target=target, dtype=dtype,
                                       opset=opset, ort_moe=ort_moe, decode=decode, scheme=scheme, stage=stage)
        parity, ok = "skipped (--no-validate)", True
        counts = node_counts(proto)
        del proto  # the graph is on disk; validation reads it from there
        if validate:
            from ..memory import release_freed_memory

            release_freed_memory()  # the write's peak must not stay under validation's (memory.py)
            stage("validate")
            # the validator reloads the checkpoint from its file; an in-memory model is passed as is
            parity, ok = _validate(tmp, model if in_memory else model.checkpoint_info["path"], quick, dtype,
                                   validate_progress)
        stage("")
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
    return ExportResult(out_dir=out, manifest=manifest.to_dict(), node_counts=counts,
                        model_bytes=sum(f["bytes"] for f in manifest.files if f["name"].startswith(MODEL_FILE)),
                        seconds=time.perf_counter() - t0, parity=parity, stage_seconds=stages)
