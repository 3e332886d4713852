"""Build a TensorRT engine from a ``--target tensorrt`` ONNX export that holds smlp plugin nodes.

    python -m smlp_export.plugins.build_engine OUT/model.onnx -o model.engine [--fp16|--bf16] [--max-seq n]

Registers the smlp plugins (``tensorrt.plugin`` AOT implementations, so the engine runs without
Python), parses the ONNX file, sets an optimization profile for the dynamic batch / sequence
dimensions and serializes the engine to a temporary file renamed into place (nothing half-written).
Without TensorRT it fails with one line: "TensorRT not installed ...".
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from pathlib import Path

from smlp_export.plugins._common import TensorRTUnavailable, import_trtp
from smlp_export.plugins.export_info import resolve_max_seq

PLUGIN_DIRS = ("smlp_token_moe", "smlp_spatial_moe", "smlp_spatial_moe_partial", "smlp_grouped_gemm")


class EngineBuildError(RuntimeError):
    """The engine could not be built (one line, shown by the CLI without a traceback)."""


def register_plugins() -> list[str]:
    """Import every plugin folder's plugin.py and call its register(); returns the op types.

    Safe to call more than once per process: each register() keeps an existing registration.
    """
    done = []
    for name in PLUGIN_DIRS:
        mod = importlib.import_module(f"smlp_export.plugins.{name}.plugin")
        mod.register()
        done.append(mod.OP_TYPE)
    return done


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str = "fp32",
                 max_batch: int = 8, max_seq: int | None = None, workspace_gib: float = 4.0) -> Path:
    """Parse ``onnx_path`` and write a serialized engine to ``engine_path``. Returns the path."""
    import_trtp()  # one clear error when TensorRT is missing or older than 10.10
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    max_seq = resolve_max_seq(onnx_path, max_seq)
    register_plugins()
    try:
        return _build(trt, onnx_path, engine_path, precision, max_batch, max_seq, workspace_gib)
    except (AttributeError, TypeError) as exc:  # e.g. a TensorRT API this code does not match
        raise EngineBuildError(f"TensorRT {getattr(trt, '__version__', '?')}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _build(trt, onnx_path: Path, engine_path: Path, precision: str, max_batch: int, max_seq: int,
           workspace_gib: float) -> Path:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # The smlp nodes carry plugin_namespace, so the parser picks the plugin over the fallback function.
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    # No PREFER_AOT flag: the smlp plugins define only @aot_impl, so TensorRT takes the AOT path (the
    # flag exists only as NetworkDefinitionCreationFlag, to choose when a plugin has both).
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = list(inp.shape)
        if any(s < 0 for s in shape):
            hi = [max_batch if j == 0 else max_seq for j, s in enumerate(shape)]
            lo = [1 if s < 0 else s for s in shape]
            hi = [h if s < 0 else s for h, s in zip(hi, shape)]
            opt = [max(1, h // 2) if s < 0 else s for h, s in zip(hi, shape)]
            profile.set_shape(inp.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=engine_path.parent, suffix=".engine.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(bytes(blob))
        os.replace(tmp, engine_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return engine_path


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
