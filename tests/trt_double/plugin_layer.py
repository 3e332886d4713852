"""Test double of ``tensorrt.plugin`` (TensorRT's pure-Python plugin layer, 10.10 - 11.x), our own code.

It reproduces the semantics the smlp plugins depend on, as read in NVIDIA's public sources
(``python/packaging/bindings_wheel/tensorrt/plugin/``: ``_lib.py``, ``_validate.py``, ``_tensor.py``,
``_plugin_class.py``, ``_utils.py``):

- ``@register``: every parameter annotated, no defaults, tensors (``TensorDesc``) first, then
  attributes of a serializable type (int / float / bytes / bool / str, or ``numpy.typing.NDArray`` of a
  serializable dtype); names ``outputs`` / ``stream`` / ``tactic`` refused; return ``TensorDesc`` or a
  tuple of them; a second registration of the same id raises ``ValueError``; the plugin creator goes
  into the (double's) TensorRT registry at once with one field per attribute.
- ``@aot_impl``: the parameter names must read exactly (tensors, registered attributes in registration
  order, ``outputs``, ``tactic``); annotated attributes must carry the registration's annotation; a
  4-tuple return annotation ``(str|bytes, str|bytes, KernelLaunchParams, SymExprs subclass)``.
- Plugin creation from fields: ``NDArray`` attribute -> ``field.data.astype(dtype)``; ``str`` ->
  ``field.data.tobytes().decode()`` (a parser NUL stays in); any other annotation ``A`` -> ``A(field.data)``
  (so ``int`` on a 1-element array raises with numpy >= 2.4, as in TensorRT). AOT is chosen when only
  ``aot_impl`` is defined.
- Descriptor calls: ``get_output_data_types`` calls the register function with *fake* shape
  expressions (``is_constant`` raises), ``get_output_shapes`` with real ones; input descriptors are
  immutable; ``like()`` returns a mutable copy.
- ``get_launch_params`` calls the AOT function positionally with ALL attributes in field order, then
  the output descriptors and the tactic; checks the returned types; every extra arg must be a
  ``SymInt32`` (an int put into ``SymIntExprs`` becomes a plain ``SymIntExpr`` and is refused).
- ``ShapeExpr``: ``is_constant`` property, ``constant_value()`` METHOD, arithmetic through TensorRT's
  expression builder; ``KernelLaunchParams`` wraps every field in ``SymInt32``.
- ``@autotune`` (``_lib.py``, ``_validate.py``, ``_autotune.py``): parameter names exactly (tensors,
  a subset of the registered attributes in registration order, ``outputs``); annotated tensors /
  attributes / ``outputs`` checked as for ``aot_impl``; return annotation ``AutoTuneCombination`` or
  ``list[AutoTuneCombination]`` (optional). ``AutoTuneCombination(io_types, layouts, tactics)``: comma-
  separated per I/O position (inputs then outputs); ``A|B`` = dependent options (all '|' positions pick
  the same index; their lengths must agree), ``A*B`` = independent options (cross product), a single
  option holds for every combination; ``FP32`` / ``FP16`` or any ``trt.DataType`` name (unknown name:
  AttributeError from ``getattr``), formats by ``trt.TensorFormat`` name; one layout string = every
  position; ``pos()`` / ``tactics()`` for the index-wise form (``pos`` takes an iterable of indices).
- Format combinations: ``get_supported_format_combinations`` calls the autotune function (inputs'
  descriptors with the network's dtypes, shape, format; the autotune attributes' RAW values; the
  output descriptors), expands every combination, merges duplicates (union of their tactics) and
  returns them flattened, ``len(I/O)`` descriptors per combination. Without an autotune function, or
  when it returns an empty list: one combination, the network's input types + the declared output
  types, all LINEAR, tactic set empty. ``configure_plugin`` records the combination TensorRT picked;
  ``get_valid_tactics`` returns ITS tactics (an unoffered combination fails an assert), in set order;
  an empty list means TensorRT's default tactic 0. ``aot_impl`` receives whatever ``set_tactic`` set.
"""
from __future__ import annotations

import builtins
import copy
import inspect
import types
import typing

import numpy as np

import tensorrt as trt  # the bindings double, installed in sys.modules by trt_double.install()

_SERIALIZABLE_BUILTINS = (int, float, bytes, bool, str)
_SERIALIZABLE_NP = (np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_, bool)
_RESERVED_NS = {"", "trt", "tensorrt", "std"}
_DISALLOWED_ATTRS = {"outputs", "stream", "tactic"}
_NP_FIELD = {np.dtype("int8"): "INT8", np.dtype("int16"): "INT16", np.dtype("int32"): "INT32",
             np.dtype("int64"): "INT64", np.dtype("float16"): "FLOAT16", np.dtype("float32"): "FLOAT32",
             np.dtype("float64"): "FLOAT64", np.dtype("bool"): "INT8"}
_BUILTIN_FIELD = {int: "INT64", float: "FLOAT64", bool: "INT8"}


# ---------------------------------------------------------------- symbolic expressions
class SymIntExpr:
    _exprBuilder = None  # set while TensorRT runs a shape / launch-parameter callback

    def __init__(self, value=None):
        self._int_expr = None
        if isinstance(value, int):
            if SymIntExpr._exprBuilder is not None:
                self._int_expr = SymIntExpr._exprBuilder.constant(value)
        elif isinstance(value, trt.IDimensionExpr):
            self._int_expr = value
        elif isinstance(value, SymIntExpr):
            self._int_expr = value._int_expr
        # anything else (numpy scalars, floats) leaves no expression, as in TensorRT
        self._is_dummy = False

    @property
    def _expr(self):
        return self._int_expr

    def _op(self, op, other):
        if isinstance(other, int):
            other = SymIntExpr(other)
        return SymIntExpr(SymIntExpr._exprBuilder.operation(op, self._expr, other._expr))

    def __add__(self, other):
        return self._op(trt.DimensionOperation.SUM, other)

    def __sub__(self, other):
        return self._op(trt.DimensionOperation.SUB, other)

    def __mul__(self, other):
        return self._op(trt.DimensionOperation.PROD, other)

    def __floordiv__(self, other):
        return self._op(trt.DimensionOperation.FLOOR_DIV, other)

    def __eq__(self, other):
        return self._op(trt.DimensionOperation.EQUAL, other)

    def __lt__(self, other):
        return self._op(trt.DimensionOperation.LESS, other)

    __hash__ = object.__hash__

    def __bool__(self):
        if not self.is_constant:
            raise RuntimeError("Cannot evaluate symbolic expression as boolean")
        return bool(self._expr.get_constant_value())

    @property
    def is_constant(self) -> bool:
        if self._is_dummy:
            raise RuntimeError("Not accessible for fake expressions")
        return self._expr.is_constant()

    def constant_value(self) -> int:
        if not self.is_constant:
            raise RuntimeError("Not accessible for non-constant expressions")
        return self._expr.get_constant_value()

    def __repr__(self):
        return f"{type(self).__name__}[{self._expr!r}]"


class _SymExprImpl(trt.ISymExpr):
    def __init__(self, expr: SymIntExpr):
        super().__init__()
        self.type = trt.PluginArgType.INT
        if not isinstance(expr, SymInt32):
            raise ValueError(f"Unknown SymIntExpr type {type(expr)}")
        self.dtype = trt.PluginArgDataType.INT32
        self.expr = expr._expr


class SymInt32(SymIntExpr):
    def __call__(self):
        return _SymExprImpl(self)


class ShapeExpr(SymInt32):
    def __init__(self, value=None):
        super().__init__(value)
        self._is_size_tensor = False
        if value is None:
            self._is_dummy = True
        elif isinstance(value, int):
            self._is_dummy = SymIntExpr._exprBuilder is None
        elif isinstance(value, ShapeExpr):
            self._is_dummy = value._is_dummy

    def _op(self, op, other):
        if self._is_dummy:
            return ShapeExpr()
        return ShapeExpr(super()._op(op, other))

    @property
    def is_fake(self) -> bool:
        return self._is_dummy

    @property
    def is_size_tensor(self) -> bool:
        return self._is_size_tensor

    def _clone(self):
        out = ShapeExpr()
        out._int_expr, out._is_dummy = self._int_expr, self._is_dummy
        return out


def _from_scalar(s):
    if isinstance(s, int):
        return SymInt32(s)
    raise ValueError(f"Unsupported type: '{type(s)}'")


class SymExprs:
    def __init__(self, length: int):
        self._length = length
        self._exprs = [None] * length

    def __iter__(self):
        return iter(self._exprs)

    def __getitem__(self, i):
        return self._exprs[i]

    def __len__(self):
        return self._length

    def __setitem__(self, i, expr):
        if i >= self._length:
            raise IndexError("Index out of range")
        self._exprs[i] = expr if isinstance(expr, SymIntExpr) else _from_scalar(expr)


class ShapeExprs(SymExprs):
    def __init__(self, length: int, _is_dummy: bool = False):
        if length > trt.Dims.MAX_DIMS:
            raise ValueError("too many dimensions")
        super().__init__(length)
        self._is_dummy = _is_dummy
        if _is_dummy:
            self._exprs = [ShapeExpr() for _ in range(length)]

    @classmethod
    def from_tuple(cls, exprs):
        exprs = [e if isinstance(e, ShapeExpr) else ShapeExpr(e) for e in exprs]
        out = cls(len(exprs))
        out._exprs = exprs
        return out

    def __setitem__(self, i, value):
        if i >= self._length:
            raise IndexError("Index out of range")
        if not isinstance(value, ShapeExpr):
            if not isinstance(value, int):
                raise ValueError(f"Value should be int or ShapeExpr. Got '{type(value)}'")
            value = ShapeExpr(value)
        self._exprs[i] = value

    def numel(self) -> ShapeExpr:
        out = ShapeExpr(1)
        for s in self._exprs:
            out = out * s
        return out

    def _clone(self):
        out = ShapeExprs.from_tuple([e._clone() for e in self._exprs])
        out._is_dummy = self._is_dummy
        return out


class SymIntExprs(SymExprs):
    def __setitem__(self, i, value):
        if i >= self._length:
            raise IndexError("Index out of range")
        if not isinstance(value, SymIntExpr):
            if not isinstance(value, int):
                raise ValueError(f"Value should be int or SymIntExpr. Got '{type(value)}'")
            value = SymIntExpr(value)  # a plain SymIntExpr: refused later as an extra arg
        self._exprs[i] = value


def cdiv(first, second) -> ShapeExpr:
    if isinstance(first, int):
        if isinstance(second, int):
            raise ValueError("Both arguments cannot be 'int's")
        first = ShapeExpr(first)
    return first._op(trt.DimensionOperation.CEIL_DIV, second)


def max(first, second) -> ShapeExpr:  # noqa: A001
    if isinstance(first, int):
        if isinstance(second, int):
            raise ValueError("Both arguments cannot be 'int's")
        first = ShapeExpr(first)
    return first._op(trt.DimensionOperation.MAX, second)


def min(first, second) -> ShapeExpr:  # noqa: A001
    if isinstance(first, int):
        if isinstance(second, int):
            raise ValueError("Both arguments cannot be 'int's")
        first = ShapeExpr(first)
    return first._op(trt.DimensionOperation.MIN, second)


class KernelLaunchParams:
    _FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

    def __init__(self, grid_x=1, grid_y=1, grid_z=1, block_x=1, block_y=1, block_z=1, shared_mem=0):
        for name, v in zip(self._FIELDS, (grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_mem)):
            setattr(self, name, v)

    def __setattr__(self, name, value):
        if name not in self._FIELDS:
            raise AttributeError(f"KernelLaunchParams object has no attribute '{name}'")
        self.__dict__[name] = SymInt32(value)


# ---------------------------------------------------------------- tensor descriptors
class Shape(tuple):
    """Concrete dims (-1 for a dynamic axis) of a descriptor during format / launch callbacks."""


class TensorDesc:
    def __init__(self, shape_expr=None, dtype=None, format=None, scale=None):  # noqa: A002
        self._shape_expr, self._dtype, self._shape = shape_expr, dtype, None
        self._format, self._scale, self._aliased_to = format, scale, None
        self._immutable = False

    def __setattr__(self, name, value):
        if getattr(self, "_immutable", False) and name != "_immutable":
            raise ValueError("Cannot modify immutable TensorDesc properties")
        super().__setattr__(name, value)

    @property
    def shape_expr(self):
        return self._shape_expr

    @shape_expr.setter
    def shape_expr(self, v):
        self._shape_expr = v

    @property
    def dtype(self):
        return self._dtype

    @dtype.setter
    def dtype(self, v):
        self._dtype = v

    @property
    def shape(self):
        if self._shape is None:
            raise ValueError("TensorDesc has no shape information available at this stage")
        return self._shape

    @shape.setter
    def shape(self, v):
        self._shape = v

    @property
    def format(self):
        if self._shape is None:
            raise ValueError("TensorDesc has no shape information available at this stage")
        return self._format

    @format.setter
    def format(self, v):
        self._format = v

    @property
    def has_shape(self) -> bool:
        return self._shape is not None

    @property
    def ndim(self) -> int:
        return len(self._shape_expr)

    @property
    def is_size_tensor(self) -> bool:
        return False

    def _clone(self) -> "TensorDesc":
        out = TensorDesc()
        out.__dict__.update(self.__dict__)
        out._immutable = False
        out._shape_expr = self._shape_expr._clone()
        out._immutable = True
        return out

    def like(self) -> "TensorDesc":
        out = self._clone()
        out._immutable = False
        return out

    def aliased(self) -> "TensorDesc":
        out = self._clone()
        out._immutable = False
        out._aliased_to = self
        out._immutable = True
        return out

    def get_aliased(self):
        return self._aliased_to


def from_shape_expr(shape_expr, dtype) -> TensorDesc:
    exprs = ShapeExprs.from_tuple(shape_expr) if isinstance(shape_expr, tuple) else shape_expr
    return TensorDesc(exprs, dtype)


class Tensor:
    """Runtime tensor of the JIT path (not used by AOT plugins)."""


# ---------------------------------------------------------------- autotune combinations
def _str_to_data_type(name: str):
    if name == "FP32":
        return trt.DataType.FLOAT
    if name == "FP16":
        return trt.DataType.HALF
    return getattr(trt.DataType, name)  # an unknown name raises AttributeError (as in TensorRT)


def _onesided(variants: list) -> list[list]:
    """Per-position options -> the list of combinations (types or formats), in TensorRT's order:
    the dependent ('|') combinations first, then each independent ('*') position's further options."""
    width = 0
    for v in variants:
        opts = v.split("|")
        if len(opts) > 1:
            if "*" in v:
                raise ValueError(f"Type/Format '{v}' contains both '|' and '*'")
            if width > 1 and width != len(opts):
                raise ValueError(f"Type/Format combinations {variants} contain illegal dependent lengths")
        width = builtins.max(width, len(opts))
    combos = [[None] * len(variants) for _ in range(width)]
    for j, v in enumerate(variants):
        opts = v.split("|")
        if len(opts) == 1:
            first = v.split("*")[0]
            for c in combos:
                c[j] = first
        else:
            for k, o in enumerate(opts):
                combos[k][j] = o
    for j, v in enumerate(variants):
        if "*" in v:
            extra = []
            for o in v.split("*")[1:]:
                for c in combos:
                    n = copy.deepcopy(c)
                    n[j] = o
                    extra.append(n)
            combos.extend(extra)
    return combos


class _TypeFormatCombination:
    def __init__(self, num: int = 0):
        self.types, self.layouts, self.tactics = [None] * num, [None] * num, []

    def __hash__(self):
        return hash((tuple(self.types), tuple(self.layouts)))

    def __eq__(self, other):
        return (isinstance(other, _TypeFormatCombination) and self.types == other.types
                and self.layouts == other.layouts)

    def __repr__(self):
        return f"{{{self.types}, {self.layouts}, tactics={self.tactics}}}"


class AutoTuneCombination:
    def __init__(self, io_types: str | None = None, layouts: str | None = None, tactics=None):
        if io_types is not None:
            self.io_types = [s.strip() for s in io_types.split(",")]
            self.layouts = [s.strip() for s in (layouts if layouts is not None else "LINEAR").split(",")]
            if len(self.layouts) > 1:
                assert len(self.io_types) == len(self.layouts)
            if len(self.io_types) > len(self.layouts):
                assert len(self.layouts) == 1
                self.layouts = [self.layouts[0]] * len(self.io_types)
        else:
            self.io_types, self.layouts = [], []
        self.combinations = []
        self._tactics = tactics

    def pos(self, pos, io_types: str, layouts: str = "LINEAR") -> None:
        top = builtins.max(pos)  # an iterable of indices (a bare int raises TypeError, as in TensorRT)
        if top >= len(self.io_types):
            self.io_types.extend([None] * (top + 1 - len(self.io_types)))
            self.layouts.extend([None] * (top + 1 - len(self.layouts)))
        for p in pos:
            if self.io_types[p] is not None:
                raise ValueError(f"Type(s) for position {p} already specified")
            if self.layouts[p] is not None:
                raise ValueError(f"Layout(s) for position {p} already specified")
            self.io_types[p], self.layouts[p] = io_types, layouts

    def tactics(self, tactics) -> None:
        self._tactics = tactics

    def _get_combinations(self) -> list:
        self.combinations = []
        for t in _onesided(self.io_types):
            for f in _onesided(self.layouts):
                c = _TypeFormatCombination(len(self.io_types))
                c.types = [_str_to_data_type(x) for x in t]
                c.layouts = [getattr(trt.TensorFormat, x) for x in f]
                c.tactics = self._tactics
                self.combinations.append(c)
        return self.combinations


# ---------------------------------------------------------------- registration
class _PluginNamespace(types.ModuleType):
    def __init__(self, ns: str):
        super().__init__(f"tensorrt.plugin.op.{ns}")
        self._namespace = ns

    def define(self, name, plugin_def):
        assert not hasattr(self, name)
        setattr(self, name, plugin_def)

    def __getattr__(self, name):
        raise AttributeError(f"namespace '{self._namespace}' has no attribute '{name}'")


class _Op(types.ModuleType):
    def __init__(self):
        super().__init__("tensorrt.plugin.op")

    def define_or_get(self, ns: str) -> _PluginNamespace:
        if ns not in self.__dict__:
            setattr(self, ns, _PluginNamespace(ns))
        return self.__dict__[ns]

    def __getattr__(self, name):
        raise AttributeError(f"'_Op' object has no attribute '{name}'")


op = _Op()
QDP_REGISTRY: dict[str, "PluginDef"] = {}


class PluginDef:
    def __init__(self):
        self.plugin_id = None
        self.register_func = self.impl_func = self.aot_impl_func = self.autotune_func = None
        self.input_tensor_names: list[str] = []
        self.input_attrs: dict[str, object] = {}
        self.aot_impl_attr_names: list[str] = []
        self.autotune_attr_names = None
        self.num_outputs = 0


def _is_ndarray_annotation(a) -> bool:
    return a is np.ndarray or typing.get_origin(a) is np.ndarray


def _ndarray_dtype(a):
    args = typing.get_args(a)
    if len(args) >= 2 and typing.get_args(args[1]):
        return typing.get_args(args[1])[0]
    raise AttributeError("Improper annotation for numpy array; use numpy.typing.NDArray[dtype]")


def _is_desc(a, cls) -> bool:
    return inspect.isclass(a) and issubclass(a, cls)


def _parse_register(fn, lazy: bool):
    tensors, attrs, field_types = [], {}, {}
    saw_attr = False
    sig = inspect.signature(fn)
    for idx, (name, p) in enumerate(sig.parameters.items()):
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise ValueError(f"Argument {name} is not a positional-or-keyword or keyword-only arg")
        if p.annotation is p.empty:
            raise ValueError(f"Argument {name} does not have a type annotation")
        if p.default is not p.empty:
            raise ValueError(f"Argument {name} has a default value")
        if _is_desc(p.annotation, TensorDesc):
            if saw_attr:
                raise ValueError("TensorDescs args and attribute args cannot be interspersed")
            tensors.append(name)
            continue
        if idx == 0:
            raise ValueError("TensorDescs args should come first, followed by attributes")
        if name in _DISALLOWED_ATTRS:
            raise ValueError(f"'{name}' is not allowed as a plugin attribute name.")
        if p.annotation in _SERIALIZABLE_BUILTINS:
            field_types[name] = (True, p.annotation)
        elif _is_ndarray_annotation(p.annotation):
            if not lazy:
                if p.annotation is np.ndarray:
                    raise ValueError("annotate numpy array attributes with numpy.typing.NDArray[dtype]")
                dt = _ndarray_dtype(p.annotation)
                if dt not in _SERIALIZABLE_NP:
                    raise ValueError(f"Attribute '{name}' is not a supported numpy array type")
                field_types[name] = (False, dt)
        else:
            raise ValueError(f"Attribute '{name}' of type {p.annotation} is not a supported serializable type")
        saw_attr = True
        attrs[name] = p.annotation
    ret = sig.return_annotation
    if ret is sig.empty:
        raise ValueError("No return annotation found for register function")
    if typing.get_origin(ret) is tuple:
        outs = typing.get_args(ret)
        if not all(_is_desc(a, TensorDesc) for a in outs):
            raise ValueError(f"Return types can only be TensorDesc or Tuple[TensorDesc], got {ret}")
        n_out = len(outs)
    elif _is_desc(ret, TensorDesc):
        n_out = 1
    else:
        raise ValueError(f"Return types can only be TensorDesc or Tuple[TensorDesc], got {ret}")
    return tensors, attrs, field_types, n_out


class _TemplatePluginCreator(trt.IPluginCreatorV3Quick):
    def __init__(self, name, namespace, field_types):
        super().__init__()
        self.name, self.plugin_namespace, self.plugin_version = name, namespace, "1"
        fields = []
        for fname, (builtin, typ) in field_types.items():
            if builtin and typ is str:
                fields.append(trt.PluginField(fname, b"", trt.PluginFieldType.CHAR))
            elif builtin and typ is bytes:
                fields.append(trt.PluginField(fname, b"", trt.PluginFieldType.UNKNOWN))
            elif builtin:
                fields.append(trt.PluginField(fname, np.array([]), getattr(trt.PluginFieldType, _BUILTIN_FIELD[typ])))
            else:
                fields.append(trt.PluginField(fname, np.array([]),
                                              getattr(trt.PluginFieldType, _NP_FIELD[np.dtype(typ)])))
        self.field_names = trt.PluginFieldCollection(fields)

    def create_plugin(self, name, namespace, fc, phase, qpcr=None):
        desc = QDP_REGISTRY[f"{namespace}::{name}"]
        attrs = {}
        for f in fc:
            if f.name not in desc.input_attrs:
                raise AssertionError(f"Unexpected attribute {f.name} provided to create_plugin")
            ann = desc.input_attrs[f.name]
            if _is_ndarray_annotation(ann):
                dt = _ndarray_dtype(ann)
                attrs[f.name] = (np.frombuffer(f.data.tobytes(), dtype=np.float16) if dt == np.float16
                                 else f.data.astype(dt))
            elif issubclass(ann, str):
                attrs[f.name] = f.data.tobytes().decode("utf-8")
            else:
                attrs[f.name] = ann(f.data)  # int(array([k])) raises with numpy >= 2.4
        aot, jit = desc.aot_impl_func is not None, desc.impl_func is not None
        R = trt.QuickPluginCreationRequest
        if qpcr == R.STRICT_AOT or (qpcr != R.STRICT_JIT and aot and not jit) or (aot and jit and qpcr == R.PREFER_AOT):
            if not aot:
                raise ValueError(f"AOT implementation requested, but not defined for '{desc.plugin_id}'")
            plg = _TemplateAOTPlugin(name, namespace, desc.num_outputs)
            plg.init(desc.register_func, attrs, desc.aot_impl_attr_names, desc.aot_impl_func,
                     desc.autotune_attr_names, desc.autotune_func)
            return plg
        if aot and jit and qpcr not in (R.PREFER_JIT, R.STRICT_JIT):
            raise ValueError(f"Plugin '{desc.plugin_id}' has both AOT and JIT implementations; set a preference")
        raise NotImplementedError("the double models AOT plugins only")


class _TemplateAOTPlugin(trt.IPluginV3, trt.IPluginV3QuickCore, trt.IPluginV3QuickBuild, trt.IPluginV3QuickAOTBuild):
    def __init__(self, name, namespace, num_outputs):
        super().__init__()
        self.plugin_name, self.plugin_namespace, self.plugin_version = name, namespace, "1"
        self.num_outputs = num_outputs
        self.kernel_map, self.supported_combs, self.curr_comb = {}, {}, None
        self.autotune_combs = []
        # no _tactic until set_tactic: TensorRT always sets one (0 = default) before launch parameters

    def init(self, register_function, attrs, aot_impl_attr_names, aot_impl_function, autotune_attr_names,
             autotune_function):
        self.register_function, self.attrs = register_function, attrs
        self.aot_impl_attr_names, self.aot_impl_function = aot_impl_attr_names, aot_impl_function
        self.autotune_attr_names, self.autotune_function = autotune_attr_names, autotune_function

    def get_capability_interface(self, kind):
        return self

    def get_num_outputs(self):
        return self.num_outputs

    def get_output_data_types(self, input_types, ranks):
        self.input_types = list(input_types)
        descs = []
        for dt, rank in zip(input_types, ranks):
            d = TensorDesc()
            d.dtype, d.shape_expr = dt, ShapeExprs(rank, _is_dummy=True)
            d._immutable = True
            descs.append(d)
        outs = self.register_function(*descs, **self.attrs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        self.output_types = [o.dtype for o in outs]
        return self.output_types

    def get_output_shapes(self, inputs, shape_inputs, expr_builder):
        assert len(shape_inputs) == 0
        SymIntExpr._exprBuilder = expr_builder
        try:
            self.input_descs = []
            for i, dims in enumerate(inputs):
                d = TensorDesc()
                d.dtype = self.input_types[i]
                d.shape_expr = ShapeExprs(len(dims))
                for j, e in enumerate(dims):
                    d.shape_expr[j] = ShapeExpr(e)
                d._immutable = True
                self.input_descs.append(d)
            outs = self.register_function(*self.input_descs, **self.attrs)
            self.output_descs = outs if isinstance(outs, tuple) else (outs,)
            result = []
            for o in self.output_descs:
                exprs = trt.DimsExprs(len(o.shape_expr))
                for j in range(len(exprs)):
                    exprs[j] = o.shape_expr[j]._expr
                result.append(exprs)
            return result
        finally:
            SymIntExpr._exprBuilder = None

    def get_supported_format_combinations(self, in_out, num_inputs):
        if self.autotune_function is not None:
            vals = [self.attrs[k] for k in self.autotune_attr_names]
            for i, d in enumerate(in_out):
                desc = self.input_descs[i] if i < num_inputs else self.output_descs[i - num_inputs]
                desc._immutable = False
                desc.shape, desc.format, desc.scale = Shape(d.desc.dims), d.desc.format, d.desc.scale
                desc._immutable = True
            self.autotune_combs = self.autotune_function(*self.input_descs, *vals, self.output_descs)
        if len(self.autotune_combs) == 0:
            combo = []
            c = _TypeFormatCombination(len(in_out))
            for j in range(len(in_out)):
                d = trt.PluginTensorDesc()
                d.type = self.input_types[j] if j < num_inputs else self.output_descs[j - num_inputs].dtype
                d.format = trt.TensorFormat.LINEAR
                c.types[j], c.layouts[j] = d.type, d.format
                combo.append(d)
            self.supported_combs[c] = set()
            return combo
        flat, self.supported_combs = [], {}
        for c in [x for atc in self.autotune_combs for x in atc._get_combinations()]:
            tactics = set(c.tactics) if c.tactics is not None else set()
            if c in self.supported_combs:
                self.supported_combs[c].update(tactics)
                continue
            self.supported_combs[c] = tactics
            for t, f in zip(c.types, c.layouts):
                d = trt.PluginTensorDesc()
                d.type, d.format = t, f
                flat.append(d)
        return flat

    def configure_plugin(self, inputs, outputs):
        self.curr_comb = _TypeFormatCombination()
        self.curr_comb.types = [d.desc.type for d in list(inputs) + list(outputs)]
        self.curr_comb.layouts = [d.desc.format for d in list(inputs) + list(outputs)]

    def get_valid_tactics(self):
        tactics = self.supported_combs.get(self.curr_comb)
        assert tactics is not None, f"configured combination {self.curr_comb} was never offered"
        return list(tactics)

    def set_tactic(self, tactic):
        self._tactic = tactic

    def get_launch_params(self, in_dims, in_out, num_inputs, launch, sym_setter, expr_builder):
        SymIntExpr._exprBuilder = expr_builder
        try:
            vals = tuple(self.attrs.values())
            types_, formats = [], []
            for i, d in enumerate(in_out):
                desc = self.input_descs[i] if i < num_inputs else self.output_descs[i - num_inputs]
                desc._immutable = False
                desc.shape, desc.dtype, desc.format = Shape(d.desc.dims), d.desc.type, d.desc.format
                desc._immutable = True
                types_.append(d.desc.type)
                formats.append(d.desc.format)
            name, ptx, params, extra = self.aot_impl_function(*self.input_descs, *vals, self.output_descs,
                                                              self._tactic)
            if not isinstance(name, (str, bytes)):
                raise TypeError(f"Kernel name must be a 'str' or 'bytes'. Got: {type(name)}.")
            if not isinstance(ptx, (str, bytes)):
                raise TypeError(f"PTX/CUBIN must be a 'str' or 'bytes'. Got: {type(ptx)}.")
            if not isinstance(params, KernelLaunchParams):
                raise TypeError(f"Launch params must be a KernelLaunchParams. Got: {type(params)}.")
            if not isinstance(extra, SymExprs):
                raise TypeError(f"Extra args must be a SymIntExprs. Got: {type(extra)}.")
            for f in KernelLaunchParams._FIELDS:
                setattr(launch, f, getattr(params, f)())
            self.kernel_map[(tuple(types_), tuple(formats), self._tactic)] = (name, ptx)
            sym_setter.nbSymExprs = len(extra)
            for i, arg in enumerate(extra):
                if not isinstance(arg, SymInt32):
                    raise TypeError(f"Extra args must be a 'tensorrt.plugin.SymInt32'. Got: {type(arg)}.")
                sym_setter[i] = arg()
        finally:
            SymIntExpr._exprBuilder = None

    def get_kernel(self, input_desc, output_desc):
        key = (tuple(d.type for d in list(input_desc) + list(output_desc)),
               tuple(d.format for d in list(input_desc) + list(output_desc)), self._tactic)
        assert key in self.kernel_map, f"key {key} not in kernel_map"
        name, ptx = self.kernel_map[key]
        return name, ptx.encode() if isinstance(ptx, str) else ptx

    def get_timing_cache_id(self):
        return ""

    def clone(self):
        out = _TemplateAOTPlugin(self.plugin_name, self.plugin_namespace, self.num_outputs)
        out.__dict__.update(self.__dict__)
        return out


def register(plugin_id: str, lazy_register: bool = False):
    def deco(fn):
        ns, name = plugin_id.split("::")
        if "." in ns or "." in name:
            raise ValueError("plugin namespace and name cannot contain '.'")
        if ns in _RESERVED_NS:
            raise ValueError(f"Provided namespace {ns} is a reserved namespace")
        space = op.define_or_get(ns)
        if hasattr(space, name):
            raise ValueError(f"'_Op' already has a defintion for '{name}'")
        tensors, attrs, field_types, n_out = _parse_register(fn, lazy_register)
        d = PluginDef()
        d.plugin_id, d.register_func, d.input_tensor_names, d.input_attrs, d.num_outputs = (
            plugin_id, fn, tensors, attrs, n_out)
        QDP_REGISTRY[plugin_id] = d
        if not lazy_register:
            registry = trt.get_plugin_registry()
            registry.register_creator(_TemplatePluginCreator(name, ns, field_types), ns)
        space.define(name, d)
        return fn
    return deco


def aot_impl(plugin_id: str):
    def deco(fn):
        if plugin_id not in QDP_REGISTRY:
            raise ValueError(f"Plugin {plugin_id} is not registered")
        d = QDP_REGISTRY[plugin_id]
        sig = inspect.signature(fn)
        attr_names = []
        for name, p in sig.parameters.items():
            a = p.annotation
            if a is p.empty:
                if name in d.input_attrs:
                    attr_names.append(name)
                continue
            if name == "outputs":
                if typing.get_origin(a) is not tuple or not all(_is_desc(x, TensorDesc) for x in typing.get_args(a)):
                    raise ValueError(f"'outputs' should be of type Tuple[TensorDesc]. Received {a}.")
            elif name == "tactic":
                if not _is_desc(a, int):
                    raise ValueError("'tactic' input argument should be an int")
            elif _is_desc(a, TensorDesc):
                if name not in d.input_tensor_names:
                    raise ValueError(f"Unexpected tensor '{name}'")
            else:
                if name not in d.input_attrs:
                    raise ValueError(f"Unexpected attribute '{name}' specified in aot_impl function")
                if a != d.input_attrs[name]:
                    raise ValueError(f"Attribute '{name}' has a type annotation different from the one at registration")
                attr_names.append(name)
        want = "(" + ", ".join(d.input_tensor_names + [n for n in d.input_attrs if n in attr_names]
                               + ["outputs", "tactic"]) + ")"
        if f"({', '.join(sig.parameters)})" != want:
            raise ValueError(f"Signature of the aot_impl function '{sig}' does not match {want}")
        ret = sig.return_annotation
        if ret is sig.empty:
            raise ValueError("No return annotation found for aot_impl function")
        args = typing.get_args(ret)
        if typing.get_origin(ret) is not tuple or len(args) != 4:
            raise ValueError(f"Return annotation is {ret}; expected a 4-tuple")
        for i in (0, 1):
            union = typing.get_origin(args[i]) in (typing.Union, types.UnionType)
            parts = typing.get_args(args[i]) if union else (args[i],)
            if not all(x in (str, bytes) for x in parts):
                raise ValueError(f"Return annotation for argument at {i} is '{args[i]}'. Expected 'str' or 'bytes'.")
        if not _is_desc(args[2], KernelLaunchParams):
            raise ValueError("Argument at index 2 of return annotation must be KernelLaunchParams")
        if not _is_desc(args[3], SymExprs):
            raise ValueError("Argument at index 3 of return annotation must be a SymExprs subclass")
        d.aot_impl_func, d.aot_impl_attr_names = fn, attr_names
        return fn
    return deco


def impl(plugin_id: str):
    def deco(fn):
        if plugin_id not in QDP_REGISTRY:
            raise ValueError(f"Plugin {plugin_id} is not registered")
        QDP_REGISTRY[plugin_id].impl_func = fn
        return fn
    return deco


def _check_param_annotation(d: PluginDef, name: str, a, what: str) -> bool:
    """True when ``name`` is an annotated attribute (checked against the registration)."""
    if name == "outputs":
        if typing.get_origin(a) is not tuple or not all(_is_desc(x, TensorDesc) for x in typing.get_args(a)):
            raise ValueError(f"'outputs' should be of type Tuple[TensorDesc]. Received {a}.")
        return False
    if _is_desc(a, TensorDesc):
        if name not in d.input_tensor_names:
            raise ValueError(f"Unexpected tensor '{name}' specified in {what} function")
        return False
    if name not in d.input_attrs:
        raise ValueError(f"Unexpected attribute '{name}' specified in {what} function")
    if a != d.input_attrs[name]:
        raise ValueError(f"Attribute '{name}' has a type annotation different from the one at registration")
    return True


def autotune(plugin_id: str):
    def deco(fn):
        if plugin_id not in QDP_REGISTRY:
            raise ValueError(f"Plugin {plugin_id} is not registered")
        d = QDP_REGISTRY[plugin_id]
        sig = inspect.signature(fn)
        attr_names = []
        for name, p in sig.parameters.items():
            if p.annotation is p.empty:
                if name in d.input_attrs:
                    attr_names.append(name)
            elif _check_param_annotation(d, name, p.annotation, "autotune"):
                attr_names.append(name)
        want = "(" + ", ".join(d.input_tensor_names + [n for n in d.input_attrs if n in attr_names]
                               + ["outputs"]) + ")"
        if f"({', '.join(sig.parameters)})" != want:
            raise ValueError(f"Specified autotune function signature {sig} is not consistent with {want}")
        ret = sig.return_annotation
        if ret is not sig.empty:
            if typing.get_origin(ret) is list:
                ok = all(_is_desc(x, AutoTuneCombination) for x in typing.get_args(ret))
            else:
                ok = _is_desc(ret, AutoTuneCombination)
            if not ok:
                raise ValueError(f"Return argument is of type {ret}. Return types can only be "
                                 "AutoTuneCombination or List[AutoTuneCombination].")
        d.autotune_func, d.autotune_attr_names = fn, attr_names
        return fn
    return deco
