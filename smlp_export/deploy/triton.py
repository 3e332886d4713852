"""A Triton Inference Server model repository from an export directory.

Layout written (atomically, via a temp sibling + rename)::

    REPO/<name>/config.pbtxt      onnxruntime backend, I/O from the ONNX graph itself
    REPO/<name>/1/model.onnx      the exported file, byte-identical (sha256 checked)
    REPO/<name>_decode/...        the same for decode.onnx when the export has one
    REPO/smlp_deploy.json         what was deployed from where (manifest + checksums)

The config is derived from the ONNX graph's inputs and outputs (names, element types, dims with
``-1`` for symbolic axes), never typed by hand. ``max_batch_size: 0`` because the graphs carry the
batch axis themselves. For the ``tensorrt`` target the same file runs on the onnxruntime backend
through its model-local fallback functions; an engine with the plugins is built on the GPU machine
(plugins/build_engine.py) and served by the TensorRT backend with the plugin library preloaded.
The decode graph is served with explicit state inputs/outputs (the client keeps the state); Triton's
implicit-state sequence batching would need a per-sequence ``position`` input, see docs/deploy.md.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_dir
from ..errors import SMLPError

# ONNX TensorProto element type -> Triton data type
_TRITON_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 7: "TYPE_INT64", 6: "TYPE_INT32",
                 9: "TYPE_BOOL", 11: "TYPE_FP64", 3: "TYPE_INT8", 2: "TYPE_UINT8"}
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def graph_io(model_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX file as Triton sees them: name, data_type, dims (-1 = dynamic)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)

    def rows(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in _TRITON_TYPES:
                raise SMLPError(f"{model_path.name}: {v.name} has ONNX element type {t.elem_type}, "
                                "which has no Triton data type")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append({"name": v.name, "data_type": _TRITON_TYPES[t.elem_type], "dims": dims})
        return out

    return rows(m.graph.input), rows(m.graph.output)


def config_pbtxt(name: str, inputs: list[dict], outputs: list[dict], *, instances: int, kind: str,
                 intra_op_threads: int) -> str:
    """Triton ``config.pbtxt`` text for the onnxruntime backend."""
    def tensor(t: dict) -> str:
        dims = ", ".join(str(d) for d in t["dims"])
        return f'  {{\n    name: "{t["name"]}"\n    data_type: {t["data_type"]}\n    dims: [ {dims} ]\n  }}'

    return "\n".join([
        f'name: "{name}"',
        'backend: "onnxruntime"',
        "max_batch_size: 0",
        "input [\n" + ",\n".join(tensor(t) for t in inputs) + "\n]",
        "output [\n" + ",\n".join(tensor(t) for t in outputs) + "\n]",
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]",
        "parameters [",
        f'  {{ key: "intra_op_thread_count" value: {{ string_value: "{intra_op_threads}" }} }}',
        "]",
        "",
    ])


def write_triton_repository(export_dir: str | Path, repo: str | Path, *, name: str = "smlp",
                            instances: int = 1, gpu: bool = False, intra_op_threads: int = 0,
                            force: bool = False) -> dict[str, Any]:
    """Write a Triton model repository for ``export_dir`` (a ``smlp export`` output) into ``repo``."""
    export_dir, repo = Path(export_dir), Path(repo)
    man_path = export_dir / "manifest.json"
    if not man_path.is_file():
        raise SMLPError(f"{export_dir} is not an export directory (no manifest.json)")
    manifest = json.loads(man_path.read_text())
    if not _NAME.match(name):
        raise SMLPError(f"model name {name!r} may only contain letters, digits, '_', '.', '-'")
    if instances < 1:
        raise SMLPError("--instances must be >= 1")
    parity_path = export_dir / "parity.json"
    parity = json.loads(parity_path.read_text()) if parity_path.is_file() else None
    if parity is not None and not parity.get("passed", False):
        raise SMLPError(f"{export_dir} failed parity validation (parity.json): refusing to deploy it")
    files = {f["name"]: f for f in manifest.get("files", [])}
    models = [("model.onnx", name)]
    if (export_dir / "decode.onnx").is_file():
        models.append(("decode.onnx", f"{name}_decode"))
    record: dict[str, Any] = {"export_dir": str(export_dir.resolve()), "target": manifest.get("target"),
                              "dtype": manifest.get("dtype"), "checkpoint": manifest.get("checkpoint"),
                              "parity_passed": None if parity is None else parity.get("passed"), "models": []}
    with atomic_dir(repo, overwrite=force) as tmp:
        for fname, mname in models:
            src = export_dir / fname
            digest = _sha256(src)
            if fname in files and files[fname].get("sha256") not in (None, digest):
                raise SMLPError(f"{src}: sha256 does not match manifest.json (file changed after export)")
            inputs, outputs = graph_io(src)
            (tmp / mname / "1").mkdir(parents=True)
            shutil.copy2(src, tmp / mname / "1" / "model.onnx")
            for extra in export_dir.glob(f"{fname}.data"):  # external data, if the export has it
                shutil.copy2(extra, tmp / mname / "1" / extra.name)
            (tmp / mname / "config.pbtxt").write_text(config_pbtxt(
                mname, inputs, outputs, instances=instances, kind="KIND_GPU" if gpu else "KIND_CPU",
                intra_op_threads=intra_op_threads))
            record["models"].append({"name": mname, "file": fname, "sha256": digest,
                                     "inputs": inputs, "outputs": outputs})
        (tmp / "smlp_deploy.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
