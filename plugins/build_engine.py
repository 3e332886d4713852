"""Build a TensorRT engine from a ``--target tensorrt`` ONNX export that holds smlp plugin nodes.

    python plugins/build_engine.py model.onnx -o model.engine [--fp16|--bf16] [--max-tokens 4096]

Registers the smlp plugins (``tensorrt.plugin`` AOT implementations, so the engine runs without
Python), parses the ONNX file, sets an optimization profile for the dynamic batch / sequence
dimensions and serializes the engine to a temporary file renamed into place (nothing half-written).
Without TensorRT it fails with one line: "TensorRT not installed ...".
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import TensorRTUnavailable, import_trtp  # noqa: E402

PLUGIN_DIRS = ("smlp_token_moe", "smlp_spatial_moe", "smlp_spatial_moe_partial")


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def register_plugins() -> list[str]:
    """Import every plugin folder's plugin.py and call its register(); returns the op types."""
    done = []
    for name in PLUGIN_DIRS:
        spec = importlib.util.spec_from_file_location(f"smlp_plugin_{name}", HERE / name / "plugin.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.register()
        done.append(mod.OP_TYPE)
    return done


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str = "fp32",
                 max_batch: int = 8, max_seq: int | None = None, workspace_gib: float = 4.0) -> Path:
    """Parse ``onnx_path`` and write a serialized engine to ``engine_path``. Returns the path."""
    import_trtp()  # one clear error when TensorRT is missing
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    register_plugins()
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
    config.set_flag(trt.BuilderFlag.PREFER_AOT_PYTHON_PLUGINS)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = list(inp.shape)
        if any(s < 0 for s in shape):
            hi = [max_batch if j == 0 else (max_seq or 1024) for j, s in enumerate(shape)]
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
    with os.fdopen(fd, "wb") as fh:
        fh.write(bytes(blob))
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600: Triton may run as another user
    os.replace(tmp, engine_path)
    return engine_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx", help="model exported with --target tensorrt")
    ap.add_argument("-o", "--output", required=True, help="engine file to write")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--fp16", action="store_const", dest="precision", const="fp16")
    g.add_argument("--bf16", action="store_const", dest="precision", const="bf16")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-seq", type=int, default=None, help="default: 1024")
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
