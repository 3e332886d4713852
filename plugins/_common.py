"""Shared glue for the smlp TensorRT plugins (plain Python; tensorrt is imported lazily).

Each plugin folder's ``plugin.py`` keeps its shape logic and launch parameters as plain functions
(tested on machines without TensorRT) and wraps them in ``tensorrt.plugin`` decorators inside
``register()``. Names, inputs and fields come from ``smlp_export.export.contract.CONTRACTS``.
"""
from __future__ import annotations

import inspect
import re
from typing import Callable

from smlp_export.export.contract import CONTRACTS, PluginContract
from smlp_plugins._fields import FIELD_ANNOTATIONS, decoding

# TensorRT DataType name -> torch dtype name used by smlp_export.kernels.aot
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}

# TensorRT 10.9's ONNX parser may look a plugin up by the node's name instead of its op_type (NVIDIA's
# own sample changed in 10.10); the exporter names nodes uniquely, so 10.10 is the floor.
MIN_TRT = (10, 10)

class TensorRTUnavailable(ImportError):
    """TensorRT (>= 10.10, with tensorrt.plugin) is not installed."""


def trt_version(version: str) -> tuple[int, int]:
    """'10.13.0.35' -> (10, 13)."""
    parts = re.findall(r"\d+", version)[:2]
    if len(parts) < 2:
        raise TensorRTUnavailable(f"cannot read the TensorRT version {version!r}")
    return int(parts[0]), int(parts[1])


def import_trtp():
    """``tensorrt.plugin`` (TensorRT >= 10.10 with AOT plugins) or a one-line error saying what to install."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp  # noqa: F401
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT not installed: the smlp plugins need TensorRT >= 10.10 with tensorrt.plugin "
            "(pip install 'smlp-export[tensorrt]' from NVIDIA's index)") from exc
    version = str(getattr(trt, "__version__", "0.0"))
    if trt_version(version) < MIN_TRT or not hasattr(trtp, "aot_impl"):
        raise TensorRTUnavailable(
            f"TensorRT {version} found: the smlp plugins need TensorRT >= {MIN_TRT[0]}.{MIN_TRT[1]} "
            "(AOT Python plugins; 10.9's ONNX parser may look plugins up by node name)")
    return trtp


def contract(op_type: str) -> PluginContract:
    return CONTRACTS[op_type]


def check_signature(fn: Callable, c: PluginContract, trailing: tuple[str, ...] = (), fields: bool = True) -> None:
    """tensorrt.plugin matches parameters by name and order: inputs, then fields (all of them; none when
    ``fields`` is False, as the smlp autotune functions take), then ``trailing``."""
    got = tuple(inspect.signature(fn).parameters)
    want = tuple(c.inputs) + (tuple(c.attributes) if fields else ()) + trailing
    if got != want:
        raise ValueError(f"{c.op_type}: plugin function {fn.__name__} takes {got}, contract needs {want}")


def trt_dtype_name(dt: object) -> str:
    """trt.DataType.HALF -> 'float16'."""
    name = str(dt).split(".")[-1]
    if name not in TRT_DTYPES:
        raise ValueError(f"unsupported TensorRT dtype {dt}; the smlp plugins support {sorted(TRT_DTYPES)}")
    return TRT_DTYPES[name]


def constant(expr: object, what: str) -> int:
    """A build-time constant dimension (expert weights are engine constants).

    ``tensorrt.plugin.ShapeExpr``: ``is_constant`` is a property, ``constant_value()`` a method.
    """
    if isinstance(expr, int):
        return expr
    if expr.is_constant:
        return int(expr.constant_value())
    raise ValueError(f"{what} must be a build-time constant dimension")


def _annotate(fn: Callable, trtp, c: PluginContract, aot: bool = False, autotune: bool = False) -> Callable:
    """tensorrt.plugin reads the parameter annotations; set them from the contract's field types."""
    ann: dict = {name: trtp.TensorDesc for name in c.inputs}
    ann.update({name: FIELD_ANNOTATIONS[t] for name, t in c.attributes.items()
                if name in inspect.signature(fn).parameters})
    if autotune:  # (inputs, outputs) -> list[AutoTuneCombination]
        ann.update({"outputs": tuple[trtp.TensorDesc], "return": list[trtp.AutoTuneCombination]})
    elif aot:
        ann.update({"outputs": tuple[trtp.TensorDesc], "tactic": int})
        ann["return"] = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]
    else:
        ann["return"] = trtp.TensorDesc
    fn.__annotations__ = ann
    return fn


def registered(trtp, c: PluginContract) -> object | None:
    """The plugin definition ``tensorrt.plugin`` holds for ``c`` in this process, or None."""
    try:
        return getattr(getattr(trtp.op, c.namespace), c.op_type)
    except AttributeError:
        return None


def register_aot(trtp, c: PluginContract, desc: Callable, aot: Callable, autotune: Callable | None = None) -> None:
    """Check the functions against the contract, annotate them, register descriptor + AOT impl (+ the
    optional ``@autotune`` function: ``(inputs..., outputs) -> list[AutoTuneCombination]``, offering
    type/format combinations and custom tactics; ``aot`` then gets the tactic TensorRT set).

    Idempotent: ``tensorrt.plugin.register`` raises for a name it already holds, so a second call in
    the same process (two engine builds, a re-imported module) keeps the first registration.
    """
    check_signature(desc, c)
    check_signature(aot, c, ("outputs", "tactic"))
    if autotune is not None:
        check_signature(autotune, c, ("outputs",), fields=False)
    plugin_def = registered(trtp, c)
    if plugin_def is None:
        trtp.register(c.qualified_name)(decoding(_annotate(desc, trtp, c), c))
        plugin_def = registered(trtp, c)
    if getattr(plugin_def, "aot_impl_func", None) is None:
        trtp.aot_impl(c.qualified_name)(decoding(_annotate(aot, trtp, c, aot=True), c))
    if autotune is not None and getattr(plugin_def, "autotune_func", None) is None:
        trtp.autotune(c.qualified_name)(_annotate(autotune, trtp, c, autotune=True))


def gpu_arch() -> int:
    """Compute capability of the build GPU (the engine is built on the GPU it will run on); 90 without one."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor
    return 90
