"""Benchmark backends: name -> how to build a ``Runner`` for it, or the reason it cannot run here.

A backend is a runtime plus, for ONNX runtimes, the export target whose graph it runs:
``ort`` = ONNX Runtime CPU on the ``--target ort`` export (com.microsoft.MoE), ``ort-portable`` =
the standard-ops-only export, ``ort-cuda*`` the same on the CUDA provider, ``tensorrt`` engines.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smlp_export.runners.base import Runner, RunnerUnavailable


@dataclass(frozen=True)
class BackendSpec:
    name: str
    runtime: str  # "torch" | "ort" | "tensorrt"
    target: str | None = None  # export target the runtime runs (ONNX runtimes only)
    provider: str | None = None  # ORT execution provider
    compile: bool = False  # torch.compile

    @property
    def dtype(self) -> str:
        return "float32"


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
    """What is benchmarked: a checkpoint directory, an export output folder, or one .onnx file."""

    path: Path | None  # None -> the embedded default checkpoint
    kind: str  # "checkpoint" | "export" | "onnx"
    onnx_by_target: dict[str, Path]
    max_seq_len: int | None = None
    corpus: str | None = None
    export_error: dict[str, str] | None = None

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
            return cls(p, "onnx", {"file": p})
        if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
            return cls(p, "checkpoint", {}, _ckpt_max_seq(p))
        onnx_files = sorted(p.glob("*.onnx"))
        if onnx_files:
            target = _export_target(p) or "file"
            max_seq = _ckpt_max_seq(p) if (p / "config.json").is_file() else None
            return cls(p, "export", {target: onnx_files[0]}, max_seq)
        raise InputError(f"{p}: neither a checkpoint (config.json + *.safetensors) nor an export (*.onnx)")


def _ckpt_max_seq(path: Path | None) -> int | None:
    from smlp_export import read_config

    return read_config(path).max_seq_len


def _export_target(folder: Path) -> str | None:
    """The export target recorded in an export folder's JSON manifest(s), if any."""
    import json

    for f in sorted(folder.glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and isinstance(d.get("target"), str):
            return d["target"]
    return None


def export_for_target(ckpt: Path | None, target: str, workdir: Path) -> Path:
    """Export the checkpoint for ``target`` with the project's exporter (``smlp export``, the
    documented command interface) into ``workdir``; returns the .onnx path.

    Raises RunnerUnavailable with the exporter's one-line error if it is missing or fails.
    """
    out = workdir / f"export-{target}"
    exe = shutil.which("smlp")
    cmd = ([exe] if exe else [sys.executable, "-m", "smlp_cli.main"]) + [
        "export", str(ckpt) if ckpt else "default", "-o", str(out), "--target", target, "--no-validate"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise RunnerUnavailable(f"export --target {target} failed: {msg[:300]}")
    files = sorted(out.glob("*.onnx")) if out.is_dir() else []
    if not files:
        raise RunnerUnavailable(f"export --target {target} wrote no .onnx file in {out}")
    return files[0]


def make_runner(spec: BackendSpec, source: Source, workdir: Path, threads: int | None) -> Runner:
    """Build (not load) the runner for ``spec`` on ``source``; RunnerUnavailable says why not."""
    if spec.runtime == "torch":
        if source.kind != "checkpoint":
            raise RunnerUnavailable(f"{spec.name} needs a checkpoint; {source.path} is an ONNX export")
        from smlp_export.runners.torch_compile_runner import TorchCompileRunner

        TorchCompileRunner.check_available()
        return TorchCompileRunner(str(source.path) if source.path else None, compile=spec.compile,
                                  threads=threads)
    if spec.runtime == "ort":
        from .ort_session import OrtFileRunner, check_provider

        check_provider(spec.provider)
        onnx = source.onnx_by_target.get(spec.target) or source.onnx_by_target.get("file")
        if onnx is None:
            if source.kind != "checkpoint":
                have = ", ".join(source.onnx_by_target) or "none"
                raise RunnerUnavailable(f"no {spec.target} export in {source.path} (has: {have})")
            onnx = export_for_target(source.path, spec.target, workdir)
            source.onnx_by_target[spec.target] = onnx
        r = OrtFileRunner(onnx, provider=spec.provider, intra_op_threads=threads)
        r.name = spec.name
        return r
    if spec.runtime == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise RunnerUnavailable("TensorRT is not installed (pip extra 'tensorrt', needs NVIDIA's libs and a GPU)") from None
        raise RunnerUnavailable("TensorRT engine runner not implemented yet")
    raise RunnerUnavailable(f"unknown runtime {spec.runtime}")  # pragma: no cover


def describe_spec(spec: BackendSpec) -> dict[str, Any]:
    return {"backend": spec.name, "target": spec.target, "dtype": spec.dtype, "provider": spec.provider}
