"""Shared glue for the smlp TensorRT plugins (plain Python; tensorrt is imported lazily).

Each plugin folder's ``plugin.py`` keeps its shape logic and launch parameters as plain functions
(tested on machines without TensorRT) and wraps them in ``tensorrt.plugin`` decorators inside
``register()``. Names, inputs and fields come from ``smlp_export.export.contract.CONTRACTS``.
"""
from __future__ import annotations

import inspect
from typing import Callable

from smlp_export.export.contract import CONTRACTS, PluginContract

# TensorRT DataType name -> torch dtype name used by smlp_export.kernels.aot
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}


class TensorRTUnavailable(ImportError):
    """TensorRT (>= 10.9, with tensorrt.plugin) is not installed."""


def import_trtp():
    """``tensorrt.plugin`` or a one-line error saying what to install."""
    try:
        import tensorrt.plugin as trtp  # noqa: F401
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT not installed: the smlp plugins need TensorRT >= 10.9 with tensorrt.plugin "
            "(pip install 'smlp-export[tensorrt]' from NVIDIA's index)") from exc
    return trtp


def contract(op_type: str) -> PluginContract:
    return CONTRACTS[op_type]


def check_signature(fn: Callable, c: PluginContract, trailing: tuple[str, ...] = ()) -> None:
    """tensorrt.plugin matches parameters by name and order: inputs, then fields, then ``trailing``."""
    got = tuple(inspect.signature(fn).parameters)
    want = tuple(c.inputs) + tuple(c.attributes) + trailing
    if got != want:
        raise ValueError(f"{c.op_type}: plugin function {fn.__name__} takes {got}, contract needs {want}")


def trt_dtype_name(dt: object) -> str:
    """trt.DataType.HALF -> 'float16'."""
    name = str(dt).split(".")[-1]
    if name not in TRT_DTYPES:
        raise ValueError(f"unsupported TensorRT dtype {dt}; the smlp plugins support {sorted(TRT_DTYPES)}")
    return TRT_DTYPES[name]


def constant(expr: object, what: str) -> int:
    """A build-time constant dimension (expert weights are engine constants)."""
    if isinstance(expr, int):
        return expr
    if getattr(expr, "is_constant", False):
        return int(expr.constant_value)
    raise ValueError(f"{what} must be a build-time constant dimension")


def _annotate(fn: Callable, trtp, c: PluginContract, aot: bool = False) -> Callable:
    """tensorrt.plugin reads the parameter annotations; set them from the contract's field types."""
    ann: dict = {name: trtp.TensorDesc for name in c.inputs}
    ann.update(dict(c.attributes))
    if aot:
        ann.update({"outputs": tuple[trtp.TensorDesc], "tactic": int})
        ann["return"] = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]
    else:
        ann["return"] = trtp.TensorDesc
    fn.__annotations__ = ann
    return fn


def register_aot(trtp, c: PluginContract, desc: Callable, aot: Callable) -> None:
    """Check both functions against the contract, annotate them, register descriptor + AOT impl."""
    check_signature(desc, c)
    check_signature(aot, c, ("outputs", "tactic"))
    trtp.register(c.qualified_name)(_annotate(desc, trtp, c))
    trtp.aot_impl(c.qualified_name)(_annotate(aot, trtp, c, aot=True))


def gpu_arch() -> int:
    """Compute capability of the build GPU (the engine is built on the GPU it will run on); 90 without one."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor
    return 90
