"""Test double of TensorRT's COMPILED Python bindings (the ``tensorrt`` module's C++ part).

Only what ``tensorrt.plugin`` and the ONNX parser / builder emulation in :mod:`.builder` touch, with
the behaviour that matters for the smlp plugins (written for this project from TensorRT's public API
documentation and the pure-Python ``tensorrt.plugin`` sources that call it):

- enums as in TensorRT (``str(DataType.HALF) == "DataType.HALF"``, ``trt.float16 is DataType.HALF``);
- ``IDimensionExpr`` / ``IExprBuilder``: symbolic dimension expressions; operations on two constants
  fold to a constant (TensorRT does too), anything with a runtime dimension stays symbolic;
  :func:`evaluate` gives the value for concrete runtime dimensions (what the tests check launch
  parameters with);
- ``PluginField.data``: a 1-D numpy array of the field's element type and length (CHAR -> int8), as
  the bindings expose a field the C++ parser filled;
- the plugin registry refuses a second creator under the same (name, version, namespace).
"""
from __future__ import annotations

import enum
import itertools
import types
from typing import Iterable

import numpy as np

__version__ = "10.13.0.35"


class ILogger:
    """Base class of a user logger (subclasses call ``ILogger.__init__(self)`` and define ``log``)."""

    def __init__(self) -> None:
        pass


class Logger(ILogger):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = 2):
        self.min_severity = min_severity
        self.messages: list[tuple[int, str]] = []

    def log(self, severity: int, msg: str) -> None:
        self.messages.append((severity, msg))


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10

    def __str__(self) -> str:  # pybind11 enums print as "DataType.HALF"
        return f"DataType.{self.name}"


float32, float16, bfloat16 = DataType.FLOAT, DataType.HALF, DataType.BF16
int8, int32, int64, uint8 = DataType.INT8, DataType.INT32, DataType.INT64, DataType.UINT8
bool = DataType.BOOL  # noqa: A001 (TensorRT's own name)

_NPTYPE = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
           DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}


def nptype(dt: DataType):
    if dt not in _NPTYPE:
        raise TypeError(f"{dt} has no numpy type")
    return _NPTYPE[dt]


class TensorFormat(enum.Enum):
    LINEAR = 0
    CHW2 = 1
    HWC8 = 2
    CHW4 = 3
    CHW16 = 4
    CHW32 = 5
    DHWC8 = 6
    CDHW32 = 7
    HWC = 8
    DLA_LINEAR = 9
    DLA_HWC4 = 10
    HWC16 = 11
    DHWC = 12

    def __str__(self) -> str:
        return f"TensorFormat.{self.name}"


class DimensionOperation(enum.Enum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


def _apply(op: DimensionOperation, a: int, b: int) -> int:
    if op in (DimensionOperation.FLOOR_DIV, DimensionOperation.CEIL_DIV) and b == 0:
        raise ZeroDivisionError("dimension expression divides by zero")
    return {
        DimensionOperation.SUM: lambda: a + b, DimensionOperation.PROD: lambda: a * b,
        DimensionOperation.MAX: lambda: max(a, b), DimensionOperation.MIN: lambda: min(a, b),
        DimensionOperation.SUB: lambda: a - b, DimensionOperation.EQUAL: lambda: int(a == b),
        DimensionOperation.LESS: lambda: int(a < b), DimensionOperation.FLOOR_DIV: lambda: a // b,
        DimensionOperation.CEIL_DIV: lambda: -(-a // b),
    }[op]()


class IDimensionExpr:
    """A dimension expression: a constant, a runtime dimension (``symbol``) or an operation."""

    def __init__(self, *, value: int | None = None, symbol: str | None = None,
                 op: DimensionOperation | None = None, args: tuple = ()):
        self._value, self._symbol, self._op, self._args = value, symbol, op, args

    def is_constant(self) -> bool:
        return self._value is not None

    def get_constant_value(self) -> int:
        if self._value is None:
            raise RuntimeError("IDimensionExpr is not a build-time constant")
        return self._value

    def is_size_tensor(self) -> bool:
        return False

    def __repr__(self) -> str:
        if self._value is not None:
            return f"Dim[{self._value}]"
        if self._symbol is not None:
            return f"Dim[{self._symbol}]"
        return f"Dim[{self._op.name}({self._args[0]!r}, {self._args[1]!r})]"


def evaluate(expr: IDimensionExpr, env: dict[str, int]) -> int:
    """Value of ``expr`` with the runtime dimensions ``env`` (symbol -> int)."""
    if expr._value is not None:
        return expr._value
    if expr._symbol is not None:
        return env[expr._symbol]
    return _apply(expr._op, evaluate(expr._args[0], env), evaluate(expr._args[1], env))


class IExprBuilder:
    def constant(self, value: int) -> IDimensionExpr:
        if not isinstance(value, int):
            raise TypeError(f"IExprBuilder.constant() takes an int, got {type(value).__name__}")
        return IDimensionExpr(value=int(value))

    def operation(self, op: DimensionOperation, first: IDimensionExpr, second: IDimensionExpr) -> IDimensionExpr:
        if not isinstance(first, IDimensionExpr) or not isinstance(second, IDimensionExpr):
            raise TypeError("IExprBuilder.operation() takes two IDimensionExpr")
        if first.is_constant() and second.is_constant():
            return IDimensionExpr(value=_apply(op, first.get_constant_value(), second.get_constant_value()))
        return IDimensionExpr(op=op, args=(first, second))

    def declare_size_tensor(self, output_index: int, opt: IDimensionExpr, upper: IDimensionExpr) -> IDimensionExpr:
        return IDimensionExpr(symbol=f"size_tensor{output_index}")


class Dims(tuple):
    MAX_DIMS = 8

    def __new__(cls, shape: Iterable[int] | int = ()):
        if isinstance(shape, int):
            shape = (0,) * shape
        shape = tuple(int(s) for s in shape)
        if len(shape) > cls.MAX_DIMS:
            raise ValueError(f"Dims holds at most {cls.MAX_DIMS} dimensions")
        return super().__new__(cls, shape)


class DimsExprs(list):
    def __init__(self, n: int | Iterable = 0):
        super().__init__([None] * n if isinstance(n, int) else list(n))

    def __setitem__(self, i, expr):
        if not isinstance(expr, IDimensionExpr):
            raise TypeError(f"DimsExprs holds IDimensionExpr, got {type(expr).__name__}")
        super().__setitem__(i, expr)


class PluginFieldType(enum.Enum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12
    FP4 = 13


_FIELD_NP = {PluginFieldType.FLOAT16: np.float16, PluginFieldType.FLOAT32: np.float32,
             PluginFieldType.FLOAT64: np.float64, PluginFieldType.INT8: np.int8, PluginFieldType.INT16: np.int16,
             PluginFieldType.INT32: np.int32, PluginFieldType.INT64: np.int64, PluginFieldType.CHAR: np.int8,
             PluginFieldType.UNKNOWN: np.uint8}


class Numpy24Array(np.ndarray):
    """numpy >= 2.4's scalar conversion rule whatever numpy is installed: ``int()`` / ``float()`` /
    ``operator.index()`` of an array with ndim > 0 raise (numpy < 2.4 only warned for size 1)."""

    def _scalar(self, kind):
        if self.ndim > 0:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return kind(self.item())

    def __int__(self):
        return self._scalar(int)

    def __float__(self):
        return self._scalar(float)

    def __index__(self):
        return self._scalar(int)


class PluginField:
    """name + typed data; ``data`` reads back as a 1-D numpy array of the type's elements."""

    def __init__(self, name: str = "", data=None, type: PluginFieldType = PluginFieldType.UNKNOWN):  # noqa: A002
        self.name = name
        self.type = type
        if data is None:
            self._raw = b""
        elif isinstance(data, (bytes, bytearray)):
            self._raw = bytes(data)
        else:
            arr = np.ascontiguousarray(data)
            # The bindings keep the buffer as given; its bytes are read back as the field's type.
            self._raw = arr.tobytes()
        self.size = len(self._raw) // np.dtype(_FIELD_NP.get(type, np.uint8)).itemsize

    @property
    def length(self) -> int:
        return self.size

    @property
    def data(self) -> np.ndarray:
        arr = np.frombuffer(self._raw, dtype=_FIELD_NP.get(self.type, np.uint8)).copy()
        return arr.view(Numpy24Array)


class PluginFieldCollection(list):
    def __init__(self, fields: Iterable[PluginField] = ()):
        super().__init__(fields)
        for f in self:
            if not isinstance(f, PluginField):
                raise TypeError("PluginFieldCollection holds PluginField")

    @property
    def nbFields(self) -> int:  # noqa: N802 (TensorRT's name)
        return len(self)


class TensorRTPhase(enum.Enum):
    BUILD = 0
    RUNTIME = 1


class QuickPluginCreationRequest(enum.Enum):
    UNKNOWN = 0
    PREFER_JIT = 1
    PREFER_AOT = 2
    STRICT_JIT = 3
    STRICT_AOT = 4


class PluginArgType(enum.Enum):
    INT = 0


class PluginArgDataType(enum.Enum):
    INT8 = 0
    INT16 = 1
    INT32 = 2


class ISymExpr:
    def __init__(self):
        self.type = None
        self.dtype = None
        self.expr = None


class PluginTensorDesc:
    def __init__(self):
        self.dims = Dims()
        self.type = DataType.FLOAT
        self.format = TensorFormat.LINEAR
        self.scale = 1.0


class DynamicPluginTensorDesc:
    def __init__(self):
        self.desc = PluginTensorDesc()
        self.min = Dims()
        self.max = Dims()
        self.opt = Dims()


class ITensor:
    """Only used by ``isinstance`` checks in tensorrt.plugin's ``trt.plugin.op`` path."""


# Plugin interfaces: Python base classes that the Python plugin layer subclasses.
class IPluginV3:
    def __init__(self):
        pass


class IPluginV3QuickCore:
    def __init__(self):
        pass


class IPluginV3QuickBuild:
    def __init__(self):
        pass


class IPluginV3QuickRuntime:
    def __init__(self):
        pass


class IPluginV3QuickAOTBuild:
    def __init__(self):
        pass


class IPluginCreatorV3Quick:
    def __init__(self):
        pass


class _PluginRegistry:
    def __init__(self):
        self._creators: dict[tuple[str, str, str], object] = {}

    def register_creator(self, creator, namespace: str = "") -> bool:
        key = (creator.name, creator.plugin_version, namespace)
        if key in self._creators:  # TensorRT logs an error and refuses
            return False
        self._creators[key] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = ""):
        return self._creators.get((name, version, namespace))

    def deregister_creator(self, creator) -> bool:
        for k, v in list(self._creators.items()):
            if v is creator:
                del self._creators[k]
                return True
        return False

    @property
    def all_creators(self) -> list:
        return list(self._creators.values())


_REGISTRY = _PluginRegistry()


def get_plugin_registry() -> _PluginRegistry:
    return _REGISTRY


_symbols = itertools.count()


def runtime_dim(name: str | None = None) -> IDimensionExpr:
    """A dimension known only at run time (what TensorRT hands a plugin for a dynamic axis)."""
    return IDimensionExpr(symbol=name or f"dim{next(_symbols)}")


class IProgressMonitor:
    """Base class of a build progress monitor (subclasses call ``IProgressMonitor.__init__(self)``).

    TensorRT calls ``phase_start(name, parent, num_steps)``, ``step_complete(name, step) -> bool``
    (False cancels the build: ``build_serialized_network`` then returns None) and ``phase_finish(name)``."""

    def __init__(self) -> None:
        self._trt_initialised = True


class ITimingCache:
    """A timing cache: created from serialized bytes (empty = new), ``serialize()`` -> a buffer."""

    def __init__(self, data: bytes) -> None:
        self.entries = bytes(data)

    def serialize(self) -> memoryview:
        return memoryview(self.entries)


def make_module(version: str = __version__) -> types.ModuleType:
    """A fresh ``tensorrt`` module object backed by this double (own registry, given version)."""
    import sys

    mod = types.ModuleType("tensorrt")
    src = sys.modules[__name__]
    for name in dir(src):
        if not name.startswith("__") and name not in ("make_module", "_REGISTRY", "_symbols"):
            setattr(mod, name, getattr(src, name))
    registry = _PluginRegistry()
    mod.get_plugin_registry = lambda: registry
    from . import builder, engine  # network / parser / builder and runtime / engine stand-ins

    mod.Builder, mod.OnnxParser = builder.Builder, builder.OnnxParser
    for name in engine.EXPORTS:
        setattr(mod, name, getattr(engine, name))
    mod.builds = []  # (network, config) of every build_serialized_network call, for the tests
    mod.__version__ = version
    mod.__path__ = []  # a package, so that ``import tensorrt.plugin`` resolves through sys.modules
    return mod


class BuilderFlag(enum.Enum):
    """TensorRT 10.x builder flags (PREFER_AOT/JIT_PYTHON_PLUGINS are network-creation flags, not these)."""
    FP16 = 0
    INT8 = 1
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 4
    DISABLE_TIMING_CACHE = 5
    TF32 = 6
    SPARSE_WEIGHTS = 7
    SAFETY_SCOPE = 8
    OBEY_PRECISION_CONSTRAINTS = 9
    PREFER_PRECISION_CONSTRAINTS = 10
    DIRECT_IO = 11
    REJECT_EMPTY_ALGORITHMS = 12
    VERSION_COMPATIBLE = 13
    EXCLUDE_LEAN_RUNTIME = 14
    FP8 = 15
    ERROR_ON_TIMING_CACHE_MISS = 16
    BF16 = 17
    DISABLE_COMPILATION_CACHE = 18
    STRIP_PLAN = 19
    REFIT_IDENTICAL = 20
    WEIGHT_STREAMING = 21
    INT4 = 22
    REFIT_INDIVIDUAL = 23
    STRICT_NANS = 24
    MONITOR_MEMORY = 25
    FP4 = 26
    EDITABLE_TIMING_CACHE = 27


class NetworkDefinitionCreationFlag(enum.Enum):
    STRONGLY_TYPED = 1
    PREFER_JIT_PYTHON_PLUGINS = 2
    PREFER_AOT_PYTHON_PLUGINS = 3


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4
    TACTIC_SHARED_MEMORY = 5
