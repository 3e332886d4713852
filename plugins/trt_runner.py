"""The TensorRT runner: an engine of a ``--target tensorrt`` export, run through Polygraphy.

``get_runner("tensorrt", OUT)`` (``smlp validate OUT --backend tensorrt``, ``smlp bench --backends
tensorrt``). ``load()`` takes the engine from ``engine=`` or ``OUT/model.engine`` when one exists
(``smlp build-engine``), else builds one into a temporary folder with ``build_engine`` (the same
plugins and profiles as ``smlp build-engine``; the export folder is not written). Either way the
engine's build manifest (``<engine>.json``) must name the export's current model.onnx (sha256): a
stale engine is refused. The bytes are deserialized with Polygraphy's ``EngineFromBytes`` and run
by its ``TrtRunner`` (device buffers, output allocator, copies back to the host).

``run(input_ids [B, T] int64)`` -> every engine output by name (``logits`` [B, T, V] plus the router
outputs), float32; the shape must lie inside the engine's profile 0 (prefill), else InputError.
Never run on real TensorRT in this project's CI: tests/trt_double stands in for TensorRT and the
CUDA runtime (see docs/validation.md).
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from smlp_export.artifacts import ENGINE_FILE, Manifest, read_json
from smlp_export.runners.base import Runner, RunnerUnavailable
INPUT = "input_ids"
# validation runs up to 32 windows in one batch (coverage search): the default built profile covers it
DEFAULT_MAX_BATCH = 32


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class TensorRTRunner(Runner):
    """A TensorRT engine run by ``polygraphy.backend.trt.TrtRunner``.

    path: an export folder (or its model.onnx) made with ``--target tensorrt``; engine: an engine
    file (default ``OUT/model.engine`` if present, else built); max_batch: the batch bound of a
    built engine's profile."""

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, *, engine: str | os.PathLike | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH) -> None:
        from smlp_export.runners.ort_runner import resolve_onnx

        self.onnx_path = resolve_onnx(path)
        self.export_dir = self.onnx_path.parent
        self.engine_path = Path(engine) if engine else None
        self.max_batch = max_batch
        self.engine_info: dict[str, Any] = {}
        self._runner: Any = None
        self._profile: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._built = False

    @classmethod
    def check_available(cls) -> None:
        from smlp_plugins._common import TensorRTUnavailable, import_trtp

        try:
            import_trtp()  # TensorRT >= 10.10 with tensorrt.plugin (the smlp plugins need it)
        except TensorRTUnavailable as e:
            raise RunnerUnavailable(str(e)) from None
        try:
            import polygraphy.backend.trt  # noqa: F401
        except ImportError:
            raise RunnerUnavailable("Polygraphy is not installed: pip install 'smlp-export[tensorrt]' "
                                    "(tensorrt + polygraphy)") from None

    # -- engine ------------------------------------------------------------------------------------
    def _export_manifest(self) -> dict[str, Any]:
        from smlp_export.errors import SMLPError

        manifest = Manifest.read(self.export_dir)  # one line naming the file for a bad manifest
        if manifest.target != "tensorrt":
            raise SMLPError(f"{self.export_dir} was exported with --target {manifest.target}; the tensorrt "
                            "backend needs an export with --target tensorrt (plugin nodes)")
        return manifest.to_dict()

    def _engine_bytes(self) -> tuple[bytes, dict[str, Any]]:
        """(plan bytes, build manifest) of the given / existing / freshly built engine."""
        from smlp_export import engine_plan as plan
        from smlp_export.errors import SMLPError
        from smlp_export.fsutil import sha256_file

        manifest = self._export_manifest()
        path = self.engine_path or (self.export_dir / ENGINE_FILE)
        if self.engine_path is not None or path.is_file():
            if not path.is_file():
                raise SMLPError(f"engine {path} does not exist (build one with `smlp build-engine {self.export_dir}`)")
            info_path = plan.manifest_path(path)
            try:
                info = read_json(info_path, what="engine build manifest")
            except SMLPError as e:
                raise SMLPError(f"{e}: rebuild the engine with `smlp build-engine {self.export_dir}`") from None
            if not isinstance(info, dict):
                raise SMLPError(f"{info_path} is not an engine build manifest: rebuild the engine with "
                                f"`smlp build-engine {self.export_dir}`")
            want = sha256_file(self.onnx_path)
            if (info.get("export") or {}).get("model_sha256") != want:
                raise SMLPError(f"engine {path} was built from another model.onnx than {self.onnx_path} "
                                f"(sha256 differs): rebuild it with `smlp build-engine {self.export_dir}`")
            return path.read_bytes(), info
        from smlp_plugins.build_engine import build_engine_with_profiles

        profiles = plan.engine_profiles(manifest, max_batch=self.max_batch, decode=False)
        precision = {"fp16": "fp16", "bf16": "bf16"}.get(str(manifest.get("dtype")), "fp32")
        with tempfile.TemporaryDirectory(prefix="smlp-trt-") as tmp:
            engine = Path(tmp) / ENGINE_FILE
            try:
                _, info = build_engine_with_profiles(self.onnx_path, engine, profiles=profiles,
                                                     export_manifest=manifest, precision=precision,
                                                     printer=plan.ProgressPrinter(io.StringIO()))
            except (RuntimeError, ValueError, FileNotFoundError) as e:
                raise SMLPError(f"TensorRT engine build failed: {_one_line(e)}") from None
            self._built = True
            return engine.read_bytes(), info

    def load(self) -> None:
        self.check_available()
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        from polygraphy.exception import PolygraphyException

        from smlp_export.errors import SMLPError

        data, self.engine_info = self._engine_bytes()
        prefill = (self.engine_info.get("profiles") or [{}])[0].get("shapes", {}).get(INPUT)
        if prefill:
            self._profile = (tuple(prefill["min"]), tuple(prefill["max"]))
        try:
            runner = TrtRunner(EngineFromBytes(data), optimization_profile=0)
            runner.activate()
        except PolygraphyException as e:
            raise SMLPError(f"TensorRT cannot load the engine: {_one_line(e)}") from None
        self._runner = runner

    # -- inference ---------------------------------------------------------------------------------
    def run(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        if self._runner is None:
            raise RuntimeError("call load() before run()")
        from polygraphy.exception import PolygraphyException

        from smlp_export.errors import InputError, SMLPError

        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if self._profile is not None:
            lo, hi = self._profile
            if ids.ndim != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, ids.shape, hi)):
                raise InputError(f"input_ids shape {ids.shape} is outside the engine's prefill profile "
                                 f"[{lo}, {hi}]: rebuild with larger bounds (smlp build-engine --max-batch / --max-shapes)")
        try:
            out = self._runner.infer({INPUT: ids})
        except PolygraphyException as e:
            raise SMLPError(f"TensorRT inference failed: {_one_line(e)}") from None
        # TrtRunner reuses its host buffers between calls: copy
        return {k: np.array(v, dtype=np.float32 if v.dtype == np.float16 else v.dtype, copy=True)
                for k, v in out.items()}

    def metadata(self) -> dict[str, Any]:
        import importlib.metadata as md

        info = self.engine_info
        try:
            polygraphy = md.version("polygraphy")
        except md.PackageNotFoundError:
            polygraphy = None
        return {"backend": self.name, "tensorrt": info.get("tensorrt_version"), "polygraphy": polygraphy,
                "model": str(self.onnx_path), "engine": (info.get("engine") or {}).get("file"),
                "engine_sha256": (info.get("engine") or {}).get("sha256"), "engine_built_here": self._built,
                "precision": info.get("precision"), "gpu": info.get("gpu"), "profiles": info.get("profiles")}

    def close(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None
