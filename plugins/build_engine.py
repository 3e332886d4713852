"""Build a TensorRT engine from a ``--target tensorrt`` ONNX export that holds smlp plugin nodes.

    python -m smlp_plugins.build_engine OUT/model.onnx -o model.engine [--fp16|--bf16] [--max-seq n]

Registers the smlp plugins (``tensorrt.plugin`` AOT implementations, so the engine runs without
Python), parses the ONNX file, sets an optimization profile for the dynamic batch / sequence
dimensions (a prefill and a decode profile, ``smlp_export.engine_plan``) and serializes the engine and its
build manifest to temporary files renamed into place (nothing half-written).
Without TensorRT it fails with one line: "TensorRT not installed ...".
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from smlp_plugins._common import TensorRTUnavailable, import_trtp
from smlp_plugins.export_info import resolve_max_seq

PLUGIN_DIRS = ("smlp_spatial_moe", "smlp_spatial_moe_partial", "smlp_grouped_gemm")


class EngineBuildError(RuntimeError):
    """The engine could not be built (one line, shown by the CLI without a traceback)."""


def register_plugins() -> list[str]:
    """Import every plugin folder's plugin.py and call its register(); returns the op types.

    Safe to call more than once per process: each register() keeps an existing registration.
    """
    done = []
    for name in PLUGIN_DIRS:
        mod = importlib.import_module(f"smlp_plugins.{name}.plugin")
        mod.register()
        done.append(mod.OP_TYPE)
    return done


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str = "fp32",
                 max_batch: int = 8, max_seq: int | None = None, workspace_gib: float = 4.0,
                 decode_profile: bool = True, printer=None) -> Path:
    """Parse ``onnx_path`` and write a serialized engine (+ its build manifest) to ``engine_path``.

    The default profiles of ``smlp build-engine`` (prefill: batch 1..max_batch, seq 1..max_seq or the
    export's n; decode: seq = 1), built by :func:`build_engine_with_profiles`. Returns the path."""
    from smlp_export import engine_plan as plan
    from smlp_export.artifacts import Manifest

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    seq = resolve_max_seq(onnx_path, max_seq)  # the export's n, or max_seq checked against it
    manifest = Manifest.read(onnx_path.parent, required=()).to_dict()
    profiles = plan.engine_profiles(manifest, max_batch=max_batch, decode=decode_profile, seq_bound=seq)
    path, _ = build_engine_with_profiles(onnx_path, engine_path, profiles=profiles, export_manifest=manifest,
                                         precision=precision, workspace_gib=workspace_gib, printer=printer)
    return path


def _gpu() -> dict:
    """Name and compute capability of the build GPU (an engine runs only on that kind of GPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    return {"name": None, "compute_capability": None}


def _progress_monitor(trt, printer):
    """A ``trt.IProgressMonitor`` forwarding TensorRT's build phases to ``printer``
    (``smlp_export.engine_plan.ProgressPrinter``)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            printer.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return printer.step_complete(phase_name, step)

        def phase_finish(self, phase_name):
            printer.phase_finish(phase_name)

    return Monitor()


def build_engine_with_profiles(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, profiles: list,
                               export_manifest: dict, precision: str = "fp32", timing_cache: str | None = None,
                               workspace_gib: float = 4.0, printer=None) -> tuple[Path, dict]:
    """``smlp build-engine``: parse ``onnx_path``, add one optimization profile per entry of
    ``profiles`` (``smlp_export.engine_plan.Profile``; profile i of the engine = profiles[i]), use
    and update the timing cache file, report build phases to ``printer``, write the engine and its
    build manifest (``<engine>.json``) atomically. Returns (engine path, manifest dict).

    The plan (profiles, option checks, manifest contents) is computed and tested in
    ``smlp_export.engine_plan``; this function only makes the TensorRT calls."""
    import_trtp()  # one clear error when TensorRT is missing or older than 10.10
    import tensorrt as trt

    try:
        return _build_with_profiles(trt, onnx_path, engine_path, profiles=profiles, export_manifest=export_manifest,
                                    precision=precision, timing_cache=timing_cache, workspace_gib=workspace_gib,
                                    printer=printer)
    except (AttributeError, TypeError) as exc:  # e.g. a TensorRT API this code does not match
        raise EngineBuildError(f"TensorRT {getattr(trt, '__version__', '?')}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _build_with_profiles(trt, onnx_path, engine_path, *, profiles: list, export_manifest: dict, precision: str,
                         timing_cache: str | None, workspace_gib: float, printer) -> tuple[Path, dict]:
    """The TensorRT calls of :func:`build_engine_with_profiles`."""
    import time

    from smlp_export import engine_plan as plan

    printer = printer or plan.ProgressPrinter()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    cache_bytes = plan.read_timing_cache(timing_cache)
    t0 = time.perf_counter()
    printer.stage("registering the smlp plugins")
    plugins = register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    printer.stage(f"parsing {onnx_path}")
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    dynamic = [network.get_input(i).name for i in range(network.num_inputs) if any(d < 0 for d in network.get_input(i).shape)]
    for p in profiles:
        missing = [name for name in dynamic if name not in p.shapes]
        if missing:
            raise RuntimeError(f"profile {p.name} gives no shapes for dynamic input(s) {', '.join(missing)}")
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    config.progress_monitor = _progress_monitor(trt, printer)
    printer.stage(f"building ({precision}, profiles: {', '.join(p.name for p in profiles)})")
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan.write_bytes_atomic(engine_path, bytes(blob))
    if timing_cache:
        plan.write_bytes_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    manifest = plan.build_manifest(
        engine_path=engine_path, export_manifest=export_manifest, onnx_path=onnx_path, precision=precision,
        profiles=profiles, plugins=plan.plugin_inventory(onnx_path), tensorrt_version=trt.__version__, gpu=_gpu(),
        timing_cache=str(timing_cache) if timing_cache else None, build_seconds=time.perf_counter() - t0,
        workspace_gib=workspace_gib)
    manifest["registered_plugins"] = plugins
    plan.write_json_atomic(plan.manifest_path(engine_path), manifest)
    return engine_path, manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx", help="model exported with --target tensorrt")
    ap.add_argument("-o", "--output", required=True, help="engine file to write")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--fp16", action="store_const", dest="precision", const="fp16")
    g.add_argument("--bf16", action="store_const", dest="precision", const="bf16")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-seq", type=int, default=None,
                    help="profile bound of the sequence dimension (default: the export's max_seq_len)")
    args = ap.parse_args(argv)
    try:
        out = build_engine(args.onnx, args.output, precision=args.precision or "fp32",
                           max_batch=args.max_batch, max_seq=args.max_seq)
    except (TensorRTUnavailable, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
