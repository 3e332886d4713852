"""What ``smlp build-engine`` asks TensorRT for, as plain Python (no TensorRT import here).

- ``parse_shapes("input_ids:1x1,...")``: trtexec-style ``--min/--opt/--max-shapes`` values;
- ``engine_profiles(manifest, ...)``: the optimization profiles of an export: ``prefill``
  (batch 1..B, seq 1..n) and ``decode`` (batch 1..B, seq = 1), where n is the model's
  ``max_seq_len`` from the export's manifest (the graph cannot run T > n: the spatial weights are
  n x n), with user overrides checked against the graph inputs and n;
- ``plugin_inventory(onnx_path)``: the plugin nodes of the file (op_type, namespace, version, count);
- ``build_manifest(...)`` / ``write_json_atomic``: the JSON written next to the engine;
- ``read_timing_cache`` / ``write_bytes_atomic``: the timing-cache file;
- ``ProgressPrinter``: TensorRT's progress-monitor callbacks as lines on a stream.

``plugins/build_engine.py`` makes the TensorRT calls with these values; everything here is tested
on machines without TensorRT.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .errors import SMLPError
from .fsutil import set_default_mode, sha256_file

ENGINE_MANIFEST_FORMAT = 1
DEFAULT_MAX_BATCH = 8
INT32_MAX = (1 << 31) - 1  # TensorRT's ONNX parser and plugins index rows with int32
PROFILE_NAMES = ("prefill", "decode")


class EngineOptionError(SMLPError, ValueError):
    """A bad build-engine option (shape syntax, unknown input, min > opt > max, T > n)."""


Shape = tuple[int, ...]


@dataclass
class Profile:
    """One TensorRT optimization profile: per dynamic input (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name,
                "shapes": {k: {"min": list(a), "opt": list(b), "max": list(c)} for k, (a, b, c) in self.shapes.items()}}


def parse_shapes(text: str | None, option: str = "--shapes") -> dict[str, Shape]:
    """``"input_ids:1x1,other:2x3x4"`` -> {"input_ids": (1, 1), "other": (2, 3, 4)} (trtexec syntax).

    Empty / None -> {}. Raises EngineOptionError naming the bad piece."""
    out: dict[str, Shape] = {}
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        name, sep, dims = part.rpartition(":")
        name = name.strip().strip("'\"")
        if not sep or not name or not dims:
            raise EngineOptionError(f"{option}: {part!r} is not NAME:DxD (e.g. input_ids:1x128)")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise EngineOptionError(f"{option}: {part!r} has a dimension that is not an integer") from None
        if any(not 1 <= d <= INT32_MAX for d in shape):
            raise EngineOptionError(f"{option}: {part!r}: every dimension must be in 1..{INT32_MAX} (int32)")
        if name in out:
            raise EngineOptionError(f"{option}: input {name!r} given twice")
        out[name] = shape
    return out


def _inputs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    ins = manifest.get("inputs")
    if not ins:
        raise EngineOptionError("manifest.json lists no graph inputs: re-export the model with `smlp export`")
    return ins


def max_seq_len(manifest: dict[str, Any]) -> int:
    """The model's n (longest sequence the graph can run), from the export's manifest."""
    n = manifest.get("max_seq_len") or (manifest.get("config") or {}).get("max_seq_len")
    if not isinstance(n, int) or n < 1:
        raise EngineOptionError("manifest.json has no max_seq_len: re-export the model with `smlp export`")
    return n


def engine_profiles(manifest: dict[str, Any], *, max_batch: int = DEFAULT_MAX_BATCH,
                    min_shapes: dict[str, Shape] | None = None, opt_shapes: dict[str, Shape] | None = None,
                    max_shapes: dict[str, Shape] | None = None, decode: bool = True,
                    seq_bound: int | None = None) -> list[Profile]:
    """The profiles for an export's model.onnx (see the module docstring).

    Axes named ``batch`` run 1..max_batch (opt max_batch // 2), axes named ``seq`` 1..n (opt n // 2)
    in ``prefill`` and exactly 1 in ``decode``; static axes keep their size. ``min/opt/max_shapes``
    replace the prefill profile's shapes of the inputs they name (every given input must be a
    dynamic graph input; rank, static sizes, min <= opt <= max and seq <= n are checked). The decode
    profile keeps seq = 1 and takes the batch bounds of the prefill profile. ``seq_bound`` (<= n)
    lowers the default prefill profile's seq bound."""
    if not 1 <= max_batch <= INT32_MAX:
        raise EngineOptionError(f"--max-batch must be in 1..{INT32_MAX} (int32), got {max_batch}")
    n = max_seq_len(manifest)
    if seq_bound is not None:
        if not 1 <= seq_bound <= n:
            raise EngineOptionError(f"--max-seq {seq_bound} must be in 1..{n} (the model's max_seq_len)")
        n = seq_bound
    given = {"--min-shapes": min_shapes or {}, "--opt-shapes": opt_shapes or {}, "--max-shapes": max_shapes or {}}
    specs = {i["name"]: list(i["shape"]) for i in _inputs(manifest)}
    dynamic = {k: v for k, v in specs.items() if any(isinstance(d, str) for d in v)}
    for opt, shapes in given.items():
        for name in shapes:
            if name not in specs:
                raise EngineOptionError(f"{opt}: {name!r} is not an input of the model (inputs: {', '.join(specs)})")
            if name not in dynamic:
                raise EngineOptionError(f"{opt}: input {name!r} has a static shape; it takes no profile")
    overridden = set().union(*[set(s) for s in given.values()])
    for name in overridden:
        missing = [o for o, s in given.items() if name not in s]
        if missing:
            raise EngineOptionError(f"input {name!r}: give all of --min-shapes, --opt-shapes, --max-shapes "
                                    f"(missing {', '.join(missing)})")
    prefill, dec = Profile("prefill"), Profile("decode")
    for name, spec in dynamic.items():
        if name in overridden:
            lo, op, hi = (given[o][name] for o in ("--min-shapes", "--opt-shapes", "--max-shapes"))
            _check_override(name, spec, lo, op, hi, n)
        else:
            lo = tuple(1 if isinstance(d, str) else d for d in spec)
            hi = tuple(max_batch if d == "batch" else n if d == "seq" else 1 if isinstance(d, str) else d for d in spec)
            op = tuple(max(1, h // 2) if isinstance(d, str) else d for d, h in zip(spec, hi))
        prefill.shapes[name] = (lo, op, hi)
        # decode: the same batch bounds, every seq axis 1
        dec.shapes[name] = tuple(tuple(1 if d == "seq" else v for d, v in zip(spec, s)) for s in (lo, op, hi))
    profiles = [prefill, dec] if decode else [prefill]
    for p in profiles:
        _check_routed_rows(p, specs, manifest)
    return profiles


def _check_routed_rows(profile: Profile, specs: dict[str, list], manifest: dict[str, Any]) -> None:
    """Refuse a profile whose largest input routes more rows through one token-MoE layer than the
    graph's counting sort counts exactly (float32: ``moe_graph.MAX_GRAPH_ROWS`` = 2^24)."""
    from .export.moe_graph import MAX_GRAPH_ROWS

    k = int((manifest.get("config") or {}).get("top_k") or 1)
    for name, (_, _, hi) in profile.shapes.items():
        tokens = 1
        for d, v in zip(specs[name], hi):
            tokens *= v if d in ("batch", "seq") else 1
        if tokens * k > MAX_GRAPH_ROWS:
            raise EngineOptionError(
                f"profile {profile.name}: {name} up to {'x'.join(map(str, hi))} routes {tokens * k} rows "
                f"(batch x seq x k={k}) through a token-MoE layer; the graph counts them exactly up to "
                f"{MAX_GRAPH_ROWS} (float32): lower --max-batch or --max-shapes")


def _check_override(name: str, spec: list, lo: Shape, op: Shape, hi: Shape, n: int) -> None:
    for label, s in (("--min-shapes", lo), ("--opt-shapes", op), ("--max-shapes", hi)):
        if len(s) != len(spec):
            raise EngineOptionError(f"{label}: {name} has rank {len(spec)} ({'x'.join(map(str, spec))}), "
                                    f"got {'x'.join(map(str, s))}")
        for axis, (d, v) in enumerate(zip(spec, s)):
            if isinstance(d, int) and v != d:
                raise EngineOptionError(f"{label}: {name} axis {axis} is static {d}, got {v}")
            if d == "seq" and v > n:
                raise EngineOptionError(f"{label}: {name} seq {v} exceeds the model's max_seq_len {n}")
    for axis in range(len(spec)):
        if not lo[axis] <= op[axis] <= hi[axis]:
            raise EngineOptionError(f"{name} axis {axis}: need min <= opt <= max, got "
                                    f"{lo[axis]} / {op[axis]} / {hi[axis]}")


def plugin_inventory(onnx_path: str | os.PathLike) -> list[dict[str, Any]]:
    """[{name, namespace, version, nodes}] of the plugin nodes (those with ``plugin_namespace``)
    in the top-level graph of ``onnx_path``, sorted by name (weights are not loaded)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found: dict[tuple[str, str, str], int] = {}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if "plugin_namespace" not in attrs:
            continue
        dec = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        key = (node.op_type, dec["plugin_namespace"], str(dec.get("plugin_version", "1")))
        found[key] = found.get(key, 0) + 1
    return [{"name": a, "namespace": b, "version": c, "nodes": k} for (a, b, c), k in sorted(found.items())]


def manifest_path(engine_path: str | os.PathLike) -> Path:
    """The build manifest next to the engine: ``model.engine`` -> ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def build_manifest(*, engine_path: str | os.PathLike, export_manifest: dict[str, Any], onnx_path: str | os.PathLike,
                   precision: str, profiles: list[Profile], plugins: list[dict[str, Any]],
                   tensorrt_version: str, gpu: dict[str, Any], timing_cache: str | None,
                   build_seconds: float, workspace_gib: float) -> dict[str, Any]:
    """The JSON that says what an engine is and what made it (written next to it)."""
    engine_path = Path(engine_path)
    model_file = Path(onnx_path).name
    listed = {f.get("name"): f.get("sha256") for f in export_manifest.get("files", [])}
    ckpt = export_manifest.get("checkpoint") or {}
    return {
        "format_version": ENGINE_MANIFEST_FORMAT,
        "engine": {"file": engine_path.name, "bytes": engine_path.stat().st_size, "sha256": sha256_file(engine_path)},
        "tensorrt_version": tensorrt_version,
        "gpu": gpu,  # {name, compute_capability}: an engine runs only on the GPU kind it was built on
        "precision": precision,
        "profiles": [p.to_dict() for p in profiles],  # profile index i = position in this list
        "plugins": plugins,
        "export": {
            "model_file": model_file,
            "model_sha256": sha256_file(onnx_path),
            "manifest_model_sha256": listed.get(model_file),
            "target": export_manifest.get("target"), "dtype": export_manifest.get("dtype"),
            "max_seq_len": export_manifest.get("max_seq_len"),
            "checkpoint_weights_sha256": ckpt.get("weights_sha256"),
        },
        "timing_cache": timing_cache,
        "workspace_gib": workspace_gib,
        "build_seconds": round(build_seconds, 3),
    }


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, then rename it into place (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        set_default_mode(tmp)  # mkstemp made it 0600: a Triton server may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: dict[str, Any]) -> Path:
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_timing_cache(path: str | os.PathLike | None) -> bytes:
    """The timing cache's bytes, or b"" when ``path`` is None or does not exist yet (first build
    creates it). A directory or an unreadable file is an error."""
    if path is None:
        return b""
    p = Path(path)
    if not p.exists():
        return b""
    if not p.is_file():
        raise EngineOptionError(f"--timing-cache {p} is not a file")
    return p.read_bytes()


class ProgressPrinter:
    """The callbacks of ``tensorrt.IProgressMonitor`` (phase_start / step_complete / phase_finish)
    printed as one line per phase start and finish, indented by nesting; step_complete returns
    True (False would cancel the build)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.phases: dict[str, tuple[str | None, int]] = {}  # name -> (parent, steps)

    def _depth(self, name: str | None) -> int:
        d = 0
        while name is not None and name in self.phases:
            name = self.phases[name][0]
            d += 1
        return d

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        self.phases[phase_name] = (parent_phase, num_steps)
        pad = "  " * (self._depth(phase_name) - 1)
        print(f"[build] {pad}{phase_name} ({num_steps} steps)", file=self.stream, flush=True)

    def step_complete(self, phase_name: str, step: int) -> bool:
        return True

    def phase_finish(self, phase_name: str) -> None:
        pad = "  " * (self._depth(phase_name) - 1)
        print(f"[build] {pad}{phase_name} done", file=self.stream, flush=True)
        self.phases.pop(phase_name, None)

    def stage(self, text: str) -> None:
        """A stage of our own (register plugins, parse, serialize)."""
        print(f"[build] {text}", file=self.stream, flush=True)


__all__ = ["EngineOptionError", "Profile", "parse_shapes", "engine_profiles", "max_seq_len", "plugin_inventory",
           "build_manifest", "manifest_path", "write_bytes_atomic", "write_json_atomic", "read_timing_cache",
           "ProgressPrinter", "PROFILE_NAMES", "DEFAULT_MAX_BATCH"]
