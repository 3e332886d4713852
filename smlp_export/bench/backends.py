"""Benchmark backends: name -> how to build a ``Runner`` for it, or the reason it cannot run here.

A backend is a runtime plus, for ONNX runtimes, the export target whose graph it runs:
``ort`` = ONNX Runtime CPU on the ``--target ort`` export (com.microsoft.MoE), ``ort-portable`` =
the standard-ops-only export, ``ort-cuda*`` the same on the CUDA provider, ``tensorrt`` engines.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smlp_export.artifacts import MODEL_FILE, Manifest, is_export_dir
from smlp_export.runners.base import Runner, RunnerUnavailable


@dataclass(frozen=True)
class BackendSpec:
    name: str
    runtime: str  # "torch" | "ort" | "tensorrt"
    target: str | None = None  # export target the runtime runs (ONNX runtimes only)
    provider: str | None = None  # ORT execution provider
    compile: bool = False  # torch.compile


BACKENDS: dict[str, BackendSpec] = {b.name: b for b in (
    BackendSpec("torch", "torch"),
    BackendSpec("torch-compile", "torch", compile=True),
    BackendSpec("ort", "ort", "ort", "CPUExecutionProvider"),
    BackendSpec("ort-portable", "ort", "portable", "CPUExecutionProvider"),
    BackendSpec("ort-cuda", "ort", "ort", "CUDAExecutionProvider"),
    BackendSpec("ort-cuda-portable", "ort", "portable", "CUDAExecutionProvider"),
    BackendSpec("tensorrt", "tensorrt", "tensorrt"),
)}
DEFAULT_BACKENDS = ("torch", "torch-compile", "ort", "ort-portable")


def parse_backends(text: str) -> list[BackendSpec]:
    """'torch,ort' -> specs; an unknown name is an InputError listing the known ones."""
    from smlp_export.errors import InputError

    out = []
    for name in (t.strip() for t in text.split(",")):
        if not name:
            continue
        if name not in BACKENDS:
            raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        out.append(BACKENDS[name])
    if not out:
        raise InputError("--backends is empty")
    return out


@dataclass
class Source:
    """What is benchmarked: a checkpoint folder, an export folder (model.onnx + manifest.json), or
    one .onnx file. ``onnx`` maps (target, dtype) -> ONNX path, filled lazily by exports."""

    path: Path | None  # None -> the embedded default checkpoint
    kind: str  # "checkpoint" | "export" | "onnx"
    onnx: dict[tuple[str, str], Path]
    max_seq_len: int | None = None
    checkpoint: Path | None = None  # for the torch backends (an export's manifest names it)

    @classmethod
    def resolve(cls, path: str | None) -> "Source":
        from smlp_export.errors import InputError

        if path is None or path == "default":
            return cls(None, "checkpoint", {}, _ckpt_max_seq(None))
        p = Path(path)
        if not p.exists():
            raise InputError(f"{p} does not exist (expected a checkpoint folder, an export folder or a .onnx file)")
        if p.is_file():
            if p.suffix != ".onnx":
                raise InputError(f"{p} is not a .onnx file nor a folder")
            return cls(p, "onnx", {("file", "file"): p})
        if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
            return cls(p, "checkpoint", {}, _ckpt_max_seq(p), checkpoint=p)
        if (p / MODEL_FILE).is_file():
            if not is_export_dir(p):  # a folder holding a bare model.onnx
                return cls(p, "export", {("file", "file"): p / MODEL_FILE}, None)
            man = Manifest.read(p)
            ckpt = man.checkpoint_path()
            ckpt = Path(ckpt) if ckpt and (Path(ckpt) / "config.json").is_file() else None
            return cls(p, "export", {(man.target, man.dtype): p / MODEL_FILE}, man.max_seq_len, checkpoint=ckpt)
        raise InputError(f"{p}: neither a checkpoint (config.json + *.safetensors) nor an export (model.onnx)")


def _ckpt_max_seq(path: Path | None) -> int | None:
    from smlp_export import read_config

    return read_config(path).max_seq_len


def export_for_target(ckpt: Path | None, target: str, dtype: str, workdir: Path) -> Path:
    """Export the checkpoint for ``target``/``dtype`` with the project's exporter (no parity check:
    the validator owns that) into ``workdir``; returns the model.onnx path.

    Raises RunnerUnavailable with the exporter's one-line error if it is missing or fails.
    """
    from smlp_export.errors import SMLPError

    out = workdir / f"export-{target}-{dtype}"
    try:
        from smlp_export.export.pipeline import export_model
    except ImportError as e:
        raise RunnerUnavailable(f"the exporter is not available: {e}") from None
    try:
        res = export_model(str(ckpt) if ckpt else None, out, target=target, dtype=dtype, validate=False, force=True)
    except SMLPError as e:
        raise RunnerUnavailable(f"export --target {target} --dtype {dtype} failed: {e}") from None
    return Path(res.out_dir) / MODEL_FILE


def make_runner(spec: BackendSpec, source: Source, workdir: Path, threads: int | None,
                dtype: str = "fp32") -> Runner:
    """Build (not load) the runner for ``spec`` on ``source``; RunnerUnavailable says why not.

    dtype: the ONNX graph's compute dtype (fp32 | fp16) for ONNX runtimes; torch runs float32.
    """
    from smlp_export.runners.registry import get_runner

    if spec.runtime == "torch":
        if source.kind == "checkpoint":
            ckpt = str(source.path) if source.path else None
        elif source.checkpoint is not None:
            ckpt = str(source.checkpoint)
        else:
            raise RunnerUnavailable(f"{spec.name} needs the checkpoint; {source.path} does not name one that exists here")
        if spec.compile:
            from smlp_export.runners.torch_compile_runner import TorchCompileRunner

            TorchCompileRunner.check_available()
            return TorchCompileRunner(ckpt, compile=True, threads=threads)
        return get_runner("torch", ckpt, threads=threads)
    if spec.runtime == "ort":
        from smlp_export.runners.ort_session import check_provider

        check_provider(spec.provider)
        onnx = _onnx_for(spec, source, workdir, dtype)
        r = get_runner("ort", onnx, providers=[spec.provider], intra_op_threads=threads)
        r.name = spec.name
        return r
    if spec.runtime == "tensorrt":  # an engine of the --target tensorrt export (smlp_plugins.trt_runner)
        from smlp_export.runners.registry import get_runner_class

        get_runner_class("tensorrt").check_available()
        onnx = _onnx_for(spec, source, workdir, dtype)
        r = get_runner("tensorrt", onnx.parent)
        r.name = spec.name
        return r
    raise RunnerUnavailable(f"unknown runtime {spec.runtime}")  # pragma: no cover


def _onnx_for(spec: BackendSpec, source: Source, workdir: Path, dtype: str) -> Path:
    """The ONNX file ``spec`` runs: the source's own export for its target, or one exported here."""
    onnx = source.onnx.get((spec.target, dtype)) or (source.onnx.get(("file", "file")) if spec.runtime == "ort" else None)
    if onnx is None:
        if source.kind != "checkpoint":
            have = ", ".join(f"{t}/{d}" for t, d in source.onnx) or "none"
            raise RunnerUnavailable(f"no {spec.target}/{dtype} export in {source.path} (has: {have})")
        onnx = export_for_target(source.path, spec.target, dtype, workdir)
        source.onnx[(spec.target, dtype)] = onnx
    return onnx


def describe_spec(spec: BackendSpec, dtype: str = "fp32") -> dict[str, Any]:
    """The identifying columns of a row: backend, export target, compute dtype, ORT provider."""
    return {"backend": spec.name, "target": spec.target,
            "dtype": dtype if spec.runtime != "torch" else "fp32", "provider": spec.provider}
