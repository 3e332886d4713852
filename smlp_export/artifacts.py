"""The export folder: every file name in it, its typed manifest, and the checkpoint that made it.

``smlp export`` writes OUT/ with::

    manifest.json      what the export is (``Manifest``): target, dtype, I/O, config, checkpoint, files[]
    model.onnx         the full-sequence graph (+ model.onnx.data when its weights are large)
    decode.onnx        the incremental step (``--decode``; + decode.onnx.data)
    decode_seq.onnx    its per-row-position twin for Triton's sequence batcher (+ .data)
    parity.json        the validation report
    model.engine       a TensorRT engine (``smlp build-engine``; + model.engine.json, its build manifest)

Every module that reads or writes these files goes through this one: the names are defined here
only (tests/test_architecture.py fails on a literal elsewhere), every path read from an export is
checked to stay inside it (``export_path``; external-data locations of the graphs included), and
every bad file gives one ``InputError`` line naming it. Only the standard library and ``errors``
are imported (``onnx`` lazily, for the external-data check): ``fsutil`` sits above this module.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import InputError, SMLPError

MANIFEST_FORMAT = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
DATA_SUFFIX = ".data"  # a graph's external weights: <graph file> + DATA_SUFFIX
DATA_FILE = MODEL_FILE + DATA_SUFFIX
DECODE_FILE = "decode.onnx"
SEQ_FILE = "decode_seq.onnx"
PARITY_FILE = "parity.json"
ENGINE_FILE = "model.engine"
ENGINE_MANIFEST_SUFFIX = ".json"  # model.engine -> model.engine.json (engine_plan.manifest_path)
DEPLOY_RECORD_FILE = "smlp_deploy.json"  # in a Triton repository: what was deployed from where
# Triton's onnxruntime backend loads <model>/<version>/model.onnx by default: the export's name.
TRITON_MODEL_FILE = MODEL_FILE
# Files that make up an export's models: each one present must be listed in manifest["files"].
GRAPH_FILE_PATTERNS = ("*.onnx", "*.onnx" + DATA_SUFFIX)
# Sources copied into Triton repositories: they run there without this package, so they name the
# repository's files themselves (tests/test_architecture.py lets them).
STANDALONE_SOURCES = ("smlp_export/deploy/full_model.py", "smlp_export/deploy/python_sequence_model.py",
                      "smlp_export/deploy/triton_generate.py")
# Every name above, for tests/test_architecture.py (a literal of one of them elsewhere fails it).
FILE_NAMES = (MANIFEST_FILE, MODEL_FILE, DATA_FILE, DECODE_FILE, DECODE_FILE + DATA_SUFFIX, SEQ_FILE,
              SEQ_FILE + DATA_SUFFIX, PARITY_FILE, ENGINE_FILE, ENGINE_FILE + ENGINE_MANIFEST_SUFFIX,
              DEPLOY_RECORD_FILE)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints and exports can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- reading files of an export ---------------------------------------------------------------
def export_path(export_dir: str | os.PathLike, name: Any, *, what: str = "file", where: Path | None = None) -> Path:
    """``export_dir / name`` for a name read from an export (by default from its manifest; else
    from ``where``), refusing one that leaves it (absolute, ``..``, a sub-folder, a symlink
    pointing out): exports are flat folders."""
    d = Path(export_dir)
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise InputError(f"{where or d / MANIFEST_FILE}: {what} {name!r} is not a file name inside the export "
                         "(refusing paths that leave the export folder)")
    p = d / name
    if p.exists() and not p.resolve().is_relative_to(d.resolve()):
        raise InputError(f"{p} points outside the export folder {d} (refusing it)")
    return p


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """The JSON in ``path``; one ``InputError`` line naming the file for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    except ValueError as e:  # JSONDecodeError
        raise InputError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(f"{path}: {what} nested too deeply to be one this tool wrote") from None


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temp file + rename) with the umask's ordinary file mode."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")  # open(): the umask's mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_parity(export_dir: str | os.PathLike) -> dict[str, Any] | None:
    """parity.json of an export (None if it was never validated)."""
    path = Path(export_dir) / PARITY_FILE
    if not path.exists():
        return None
    report = read_json(path, what="parity report")
    if not isinstance(report, dict) or not isinstance(report.get("passed", False), bool):
        raise InputError(f"{path}: not a parity report (a JSON object with a boolean 'passed')")
    return report


def file_entry(directory: Path, name: str) -> dict[str, Any]:
    """The manifest's record of one written file: name, bytes, sha256."""
    p = Path(directory) / name
    return {"name": name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def check_external_data(export_dir: Path, graph: Path) -> None:
    """Refuse a graph whose external-data ``location`` fields point outside ``export_dir`` (read
    from the graph's protobuf without loading any weight)."""
    import onnx

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as e:  # DecodeError and friends: a truncated or non-ONNX file
        raise InputError(f"{graph}: not a readable ONNX model ({type(e).__name__})") from None
    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in tensor.external_data if e.key == "location"), None)
            export_path(export_dir, loc, what=f"external data location of {tensor.name!r}", where=graph)


def _tensors(model) -> list:
    """Every TensorProto of a model: initializers and node attributes, subgraphs and functions included."""
    out, graphs = [], [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    while graphs:
        g = graphs.pop()
        out.extend(g.initializer)
        nodes.extend(g.node)
        while nodes:
            for a in nodes.pop().attribute:
                out.extend([a.t] if a.HasField("t") else [])
                out.extend(a.tensors)
                graphs.extend([a.g] if a.HasField("g") else [])
                graphs.extend(a.graphs)
    return out


# ---- the manifest -----------------------------------------------------------------------------
_KINDS = {int: "an integer", str: "a string", dict: "an object", list: "a list"}


@dataclass
class Manifest:
    """manifest.json: what the export is, what it expects and what made it.

    ``checkpoint``: {name, path (relative to the export folder; never the host's absolute path),
    weights_sha256}. ``files``: {name, bytes, sha256} of every graph file. ``decode``: the decode
    graph's section (``decode/export.decode_manifest``; its ``sequence`` the per-row twin's) or None.
    """

    target: str = ""
    dtype: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)
    opset: int | None = None
    ir_version: int | None = None
    ort_moe: str | None = None
    output_dtype: str = "float32"
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    routing_outputs: dict[str, Any] = field(default_factory=dict)
    max_seq_len: int | None = None
    custom_domains: list[str] = field(default_factory=list)
    tool_versions: dict[str, Any] = field(default_factory=dict)
    decode: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None  # quantized exports only (smlp_export.quantize.manifest_entry)
    format_version: int = MANIFEST_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read
    dir: Path | None = field(default=None, compare=False, repr=False)  # where it was read from

    REQUIRED = ("target", "dtype", "checkpoint", "config")  # what every reader but a section reader needs
    _TYPES = {"target": str, "dtype": str, "config": dict, "checkpoint": dict, "files": list, "opset": int,
              "ir_version": int, "ort_moe": str, "output_dtype": str, "inputs": list, "outputs": list,
              "routing_outputs": dict, "max_seq_len": int, "custom_domains": list, "tool_versions": dict,
              "decode": dict, "quantization": dict, "format_version": int}

    # -- read / validate
    @classmethod
    def read(cls, export_dir: str | os.PathLike, *, required: tuple[str, ...] = REQUIRED) -> Manifest:
        """The manifest of ``export_dir``, validated (one ``InputError`` line naming the file).
        ``required``: the keys the caller needs (a reader of one section passes fewer)."""
        d = Path(export_dir)
        if not d.exists():
            raise InputError(f"{d} does not exist (expected an export folder from `smlp export`)")
        if not d.is_dir():
            raise InputError(f"{d} is not a folder (expected an export folder from `smlp export`)")
        if not (d / MANIFEST_FILE).is_file():
            raise InputError(f"{d / MANIFEST_FILE} is missing: not an export folder from `smlp export`")
        return cls.from_dict(read_json(d / MANIFEST_FILE, what="manifest"), d, required=required)

    @classmethod
    def from_dict(cls, data: Any, export_dir: str | os.PathLike, *, required: tuple[str, ...] = REQUIRED) -> Manifest:
        d = Path(export_dir)
        where = d / MANIFEST_FILE
        if not isinstance(data, dict):
            raise InputError(f"{where} must hold a JSON object, got {type(data).__name__}")
        missing = [k for k in required if k not in data]
        if missing:
            raise InputError(f"{where} lacks key(s) {', '.join(missing)}")
        for key, kind in cls._TYPES.items():
            v = data.get(key)
            if v is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
                raise InputError(f"{where}: {key!r} must be {_KINDS[kind]}, got {type(v).__name__}")
        known = {f.name for f in fields(cls)} - {"extra", "dir"}
        m = cls(**{k: v for k, v in data.items() if k in known and v is not None or k == "decode"},
                extra={k: v for k, v in data.items() if k not in known}, dir=d)
        if m.format_version != MANIFEST_FORMAT:
            raise InputError(f"{where}: unknown format_version {m.format_version} (this version reads "
                             f"{MANIFEST_FORMAT})")
        m._check_paths()
        return m

    def _check_paths(self) -> None:
        """Every file name the manifest gives must stay inside the export folder."""
        for e in self.files:
            if not isinstance(e, dict):
                raise InputError(f"{self.dir / MANIFEST_FILE}: files[] entries must be objects, got {e!r}")
            export_path(self.dir, e.get("name"), what="files[] entry")
        for section, where in ((self.decode, "decode"), (self.sequence, "decode.sequence")):
            if section is not None:
                export_path(self.dir, section.get("file"), what=f"{where}.file")
                if "data_file" in section:
                    export_path(self.dir, section["data_file"], what=f"{where}.data_file")

    @property
    def sequence(self) -> dict[str, Any] | None:
        """The per-row-position decode graph's section (decode_seq.onnx), if exported."""
        seq = (self.decode or {}).get("sequence")
        if seq is not None and not isinstance(seq, dict):
            raise InputError(f"{self.dir / MANIFEST_FILE}: 'decode.sequence' must be an object")
        return seq

    def path(self, name: str) -> Path:
        """A file of this export by name (checked to stay inside it)."""
        return export_path(self.dir, name)

    def decode_path(self) -> Path | None:
        """decode.onnx of this export (None when it was exported without ``--decode``)."""
        return None if not self.decode else self.path(self.decode.get("file", DECODE_FILE))

    # -- write
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "dir")}
        if out["quantization"] is None:  # the key exists only in quantized exports
            del out["quantization"]
        return {**self.extra, **out}

    def write(self, export_dir: str | os.PathLike) -> None:
        write_json(Path(export_dir) / MANIFEST_FILE, self.to_dict())

    def add_files(self, directory: Path, names: list[str]) -> None:
        self.files.extend(file_entry(directory, n) for n in names)

    # -- integrity
    def verify_files(self, *, required: tuple[str, ...] = (MODEL_FILE,)) -> dict[str, str]:
        """Check every graph file in the export against ``files[]``; {name: sha256}.

        One-line ``InputError`` for: a graph file on disk that the manifest does not list, a listed
        file that is missing, a size or sha256 that differs, a manifest without checksums, or a
        graph whose external data lives outside the export.
        """
        man = self.dir / MANIFEST_FILE
        if not self.files:
            raise InputError(f"{man} records no file checksums (files[]): re-export with `smlp export`")
        listed: dict[str, dict[str, Any]] = {}
        for e in self.files:
            if not isinstance(e.get("sha256"), str):
                raise InputError(f"{man}: every files[] entry needs a name and a sha256, got {e!r}")
            listed[e["name"]] = e
        on_disk = sorted({p.name for pat in GRAPH_FILE_PATTERNS for p in self.dir.glob(pat) if p.is_file()})
        for name in on_disk:
            if name not in listed:
                raise InputError(f"{self.dir / name} is not listed in {man.name} (no recorded sha256): refusing it")
        for name in required:
            if name not in listed:
                raise InputError(f"{man} records no sha256 for {name}: re-export with `smlp export`")
        digests: dict[str, str] = {}
        for name, e in listed.items():
            path = self.path(name)
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
        for name in listed:
            if name.endswith(".onnx"):
                check_external_data(self.dir, self.dir / name)
        return digests

    # -- origin
    def checkpoint_path(self) -> str | None:
        """The checkpoint this export was made from, as ``load_checkpoint`` takes it (None if unknown):
        its recorded path resolved against the export folder, or the name of the default checkpoint."""
        path, name = self.checkpoint.get("path"), self.checkpoint.get("name")
        if isinstance(path, str) and path:
            return os.path.normpath(self.dir / path)  # an absolute path (older exports) stays as is
        return name if name == DEFAULT_CHECKPOINT else None


DEFAULT_CHECKPOINT = "default"  # the name of the checkpoint shipped in the package (checkpoint.DEFAULT_NAME)


def checkpoint_record(ckpt_path: str | os.PathLike | None, name: str, weights_sha256: str | None,
                      out: str | os.PathLike) -> dict[str, Any]:
    """manifest["checkpoint"]: the checkpoint's name, its path relative to the export folder ``out``
    (not the host's absolute path: exports are copied between machines), its weights' sha256."""
    rel = None
    if ckpt_path is not None and name != DEFAULT_CHECKPOINT:
        rel = Path(os.path.relpath(Path(ckpt_path).resolve(), Path(out).resolve())).as_posix()
    return {"name": name, "path": rel, "weights_sha256": weights_sha256}


def is_export_dir(path: str | os.PathLike) -> bool:
    """True for a folder written by ``smlp export`` (it holds manifest.json)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_FILE).is_file()


_HINT = ("pass the checkpoint itself (`smlp generate CKPT`), or use `--backend ort` on an export "
         "made with `smlp export --decode`")


def checkpoint_of_export(out: str | os.PathLike) -> tuple[str, str | None]:
    """(checkpoint path or name, recorded weights sha256) of the export ``out``.

    Raises ``SMLPError`` (one line, with what to do) when the manifest records no usable checkpoint.
    """
    try:
        m = Manifest.read(out)
    except InputError as e:
        raise SMLPError(f"{e}; {_HINT}") from None
    path = m.checkpoint_path()
    if not path:
        raise SMLPError(f"{out} is an export of an in-memory model (its manifest records no checkpoint "
                        f"path): {_HINT}")
    if path != DEFAULT_CHECKPOINT and not Path(path).is_dir():
        raise SMLPError(f"{out} is an export; the checkpoint it was made from ({path}) no longer exists: {_HINT}")
    return path, m.checkpoint.get("weights_sha256")


def export_hint(out: str | os.PathLike) -> str:
    """What to pass instead of the export ``out`` where a checkpoint is needed."""
    try:
        path = Manifest.read(out).checkpoint_path()
    except SMLPError:
        path = None
    how = "; an export loads with onnxruntime.InferenceSession(OUT/model.onnx) or `smlp validate OUT`"
    return (f"pass the checkpoint it was made from ({path})" if path else "pass the checkpoint it was made from") + how
