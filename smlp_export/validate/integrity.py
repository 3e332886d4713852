"""What an export folder really holds: file checksums against manifest.json, and the dtype the graph
computes in (read from the graph, never from the manifest's label).

``smlp export`` records ``{name, bytes, sha256}`` of every model file (model.onnx, model.onnx.data,
decode.onnx, ...) in ``manifest["files"]``. Validation and deployment refuse a folder whose files do
not match that record (``verify_files``), so a parity.json or a deployment always describes the bytes
that were exported. The tolerance table is chosen by ``graph_dtype`` (the element type of the
graph's floating-point weights): relabelling an fp32 export as "fp16" in manifest.json cannot buy
it the looser fp16 tolerances.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from smlp_export.errors import InputError
from ..fsutil import sha256_file

# Files that make up an export's models: each one present must be listed in manifest["files"].
MODEL_FILE_PATTERNS = ("*.onnx", "*.onnx.data")

# ONNX TensorProto element types of floating-point weights -> the project's dtype names.
_FLOAT_ELEMS = {1: "fp32", 10: "fp16", 16: "bf16", 11: "fp64"}


def verify_files(export_dir: Path, manifest: dict[str, Any], *, required: tuple[str, ...] = ("model.onnx",)) -> dict[str, str]:
    """Check every model file in ``export_dir`` against ``manifest["files"]``; {name: sha256}.

    One-line ``InputError`` for: a model file on disk that the manifest does not list, a listed
    file that is missing, a size or sha256 that differs, or a manifest without checksums.
    """
    man = export_dir / "manifest.json"
    entries = manifest.get("files")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{man} records no file checksums (files[]): re-export with `smlp export`")
    listed: dict[str, dict[str, Any]] = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(e.get("sha256"), str):
            raise InputError(f"{man}: every files[] entry needs a name and a sha256, got {e!r}")
        listed[e["name"]] = e
    on_disk = sorted({p.name for pat in MODEL_FILE_PATTERNS for p in export_dir.glob(pat) if p.is_file()})
    for name in on_disk:
        if name not in listed:
            raise InputError(f"{export_dir / name} is not listed in {man.name} (no recorded sha256): refusing it")
    for name in required:
        if name not in listed:
            raise InputError(f"{man} records no sha256 for {name}: re-export with `smlp export`")
    digests: dict[str, str] = {}
    for name, e in listed.items():
        path = export_dir / name
        if not path.is_file():
            raise InputError(f"{path} is missing (listed in {man.name})")
        if "bytes" in e and path.stat().st_size != e["bytes"]:
            raise InputError(f"{path} has {path.stat().st_size} bytes but {man.name} records {e['bytes']}: "
                             "the file changed after export")
        got = sha256_file(path)
        if got != e["sha256"]:
            raise InputError(f"{path} has sha256 {got[:12]}... but {man.name} records {e['sha256'][:12]}...: "
                             "the file changed after export")
        digests[name] = got
    return digests


def graph_dtype(onnx_path: Path) -> str:
    """The dtype a graph computes in: the element type holding most floating-point weight values
    (initializers and Constant nodes, external data included by its declared shape)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    counts: dict[str, int] = {}

    def add(t: onnx.TensorProto) -> None:
        name = _FLOAT_ELEMS.get(t.data_type)
        if name is not None:
            n = 1
            for d in t.dims:
                n *= int(d)
            counts[name] = counts.get(name, 0) + n

    for t in m.graph.initializer:
        add(t)
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    add(a.t)
    if not counts:
        raise InputError(f"{onnx_path} has no floating-point weights: cannot tell its dtype")
    return max(counts, key=lambda k: counts[k])
