"""Shared glue for the smlp TensorRT plugins (plain Python; tensorrt is imported lazily).

Each plugin folder's ``plugin.py`` keeps its shape logic and launch parameters as plain functions
(tested on machines without TensorRT) and wraps them in ``tensorrt.plugin`` decorators inside
``register()``. Names, inputs and fields come from ``smlp_export.export.contract.CONTRACTS``.
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import Callable

import numpy as np
import numpy.typing as npt

from smlp_export.export.contract import CONTRACTS, PluginContract

# TensorRT DataType name -> torch dtype name used by smlp_export.kernels.aot
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}

# TensorRT 10.9's ONNX parser may look a plugin up by the node's name instead of its op_type (NVIDIA's
# own sample changed in 10.10); the exporter names nodes uniquely, so 10.10 is the floor.
MIN_TRT = (10, 10)

# How each contract field type is declared to tensorrt.plugin. TensorRT builds the plugin from fields
# with ``annotation(field.data)``, and field.data is a 1-element array for an ONNX INT / FLOAT attribute
# (the parser encodes INT as int32[1], FLOAT as float32[1]): ``int(array([k]))`` raises with
# numpy >= 2.4. Declared as 1-D numpy arrays, the data arrive as ``field.data.astype(dtype)`` and
# :func:`decode_field` turns them into Python scalars. Strings arrive as ``bytes.decode()`` of the
# field, which the parser NUL-terminates (the terminator is counted in the field length).
FIELD_ANNOTATIONS: dict[type, object] = {int: npt.NDArray[np.int32], float: npt.NDArray[np.float32], str: str}

# A field value we accept: printable ASCII, no NUL (after dropping the parser's one terminator).
_FIELD_STR = re.compile(r"[ -~]*")


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
    """A build-time constant dimension (expert weights are engine constants).

    ``tensorrt.plugin.ShapeExpr``: ``is_constant`` is a property, ``constant_value()`` a method.
    """
    if isinstance(expr, int):
        return expr
    if expr.is_constant:
        return int(expr.constant_value())
    raise ValueError(f"{what} must be a build-time constant dimension")


def decode_field(c: PluginContract, name: str, value: object) -> object:
    """A plugin field as TensorRT hands it over -> the Python value the contract declares.

    int / float: a 1-element numpy array (what the ONNX parser sends) or a Python scalar; str: the text,
    with the parser's single trailing NUL removed. Anything else is a ValueError naming the field.
    """
    typ = c.attributes[name]
    if typ is str:
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if not isinstance(value, str):
            raise ValueError(f"{c.op_type}.{name}: expected a string field, got {type(value).__name__}")
        text = value[:-1] if value.endswith("\0") else value
        if not _FIELD_STR.fullmatch(text):
            raise ValueError(f"{c.op_type}.{name}: malformed string field {value!r}")
        return text
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"{c.op_type}.{name}: expected one {typ.__name__}, got {value.size} values")
        value = value.reshape(-1)[0].item()
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{c.op_type}.{name}: expected {typ.__name__}, got {value!r}")


def _decoding(fn: Callable, c: PluginContract) -> Callable:
    """``fn`` called with decoded fields; same signature as ``fn`` (tensorrt.plugin inspects it)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        for name in c.attributes:
            if name in bound.arguments:
                bound.arguments[name] = decode_field(c, name, bound.arguments[name])
        return fn(*bound.args, **bound.kwargs)

    return wrapper


def _annotate(fn: Callable, trtp, c: PluginContract, aot: bool = False) -> Callable:
    """tensorrt.plugin reads the parameter annotations; set them from the contract's field types."""
    ann: dict = {name: trtp.TensorDesc for name in c.inputs}
    ann.update({name: FIELD_ANNOTATIONS[t] for name, t in c.attributes.items()})
    if aot:
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


def register_aot(trtp, c: PluginContract, desc: Callable, aot: Callable) -> None:
    """Check both functions against the contract, annotate them, register descriptor + AOT impl.

    Idempotent: ``tensorrt.plugin.register`` raises for a name it already holds, so a second call in
    the same process (two engine builds, a re-imported module) keeps the first registration.
    """
    check_signature(desc, c)
    check_signature(aot, c, ("outputs", "tactic"))
    plugin_def = registered(trtp, c)
    if plugin_def is None:
        trtp.register(c.qualified_name)(_decoding(_annotate(desc, trtp, c), c))
        plugin_def = registered(trtp, c)
    if getattr(plugin_def, "aot_impl_func", None) is None:
        trtp.aot_impl(c.qualified_name)(_decoding(_annotate(aot, trtp, c, aot=True), c))


def check_no_scratch(ck: object, op_type: str) -> None:
    """TensorRT's AOT launch passes only the inputs, the extra int32 args and the outputs; Triton's
    two appended scratch pointers then hold whatever follows. Fine only while the kernel needs no
    scratch memory: fail the build otherwise instead of letting the kernel read a garbage pointer."""
    need = {"global_scratch_size": ck.global_scratch, "profile_scratch_size": ck.profile_scratch}
    if any(v != 0 for v in need.values()):
        raise RuntimeError(f"{op_type}: kernel {ck.name} needs Triton scratch memory {need}; an AOT plugin "
                           "cannot provide it")


def aot_compile(op_type: str, kernel: str, dtype: object, constexprs: dict[str, int], num_warps: int):
    """PTX of a plugin kernel for the build GPU (``smlp_export.kernels.aot``), checked scratch-free."""
    from smlp_export.kernels.aot import compile_ptx

    ck = compile_ptx(kernel, trt_dtype_name(dtype), arch=gpu_arch(), constexprs=constexprs, num_warps=num_warps)
    check_no_scratch(ck, op_type)
    return ck


def gpu_arch() -> int:
    """Compute capability of the build GPU (the engine is built on the GPU it will run on); 90 without one."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor
    return 90
