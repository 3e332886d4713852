"""What TensorRT's ONNX parser and builder do with a plugin node, against the bindings double.

- :func:`parser_fields`: onnx-tensorrt's ``loadFields`` (FallbackPluginImporter): one field per
  creator field name, in the CREATOR's order, skipped when the node lacks the attribute; INT ->
  int32[1] (INT32), FLOAT -> float32[1] (FLOAT32), STRING -> the bytes + a NUL terminator that
  is counted in the length (CHAR), INTS / FLOATS -> int32[n] / float32[n], STRINGS -> each string
  NUL-terminated.
- :func:`import_plugin`: the creator looked up by (op_type, plugin_version = "1", plugin_namespace
  = ""), plugin created in the BUILD phase with no AOT/JIT preference (no network flag set).
- :func:`build_plugin`: the builder's calls, in order: output types (fake shapes), output shapes
  (symbolic), supported format combinations (the first whose input types are the network's is
  configured: a strongly typed network, no reformatting inserted), configure, valid tactics, then
  per tactic (TensorRT's default 0 when none is offered) set tactic, launch parameters + extra args,
  kernel: the builder's timing pass asks for every tactic's kernel. The double cannot time kernels:
  ``pick`` stands in for "fastest" (default: the smallest tactic), or ``tactic=`` builds one only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper


class ParserError(RuntimeError):
    pass


def parser_fields(trt, node: onnx.NodeProto, creator) -> list:
    attrs = {a.name: a for a in node.attribute}
    fields = []
    for want in creator.field_names:
        a = attrs.get(want.name)
        if a is None:
            continue  # TensorRT warns and relies on a creator default
        T = onnx.AttributeProto
        if a.type == T.INT:
            fields.append(trt.PluginField(a.name, np.array([a.i], dtype=np.int32), trt.PluginFieldType.INT32))
        elif a.type == T.FLOAT:
            fields.append(trt.PluginField(a.name, np.array([a.f], dtype=np.float32), trt.PluginFieldType.FLOAT32))
        elif a.type == T.STRING:
            fields.append(trt.PluginField(a.name, a.s + b"\0", trt.PluginFieldType.CHAR))
        elif a.type == T.INTS:
            fields.append(trt.PluginField(a.name, np.array(a.ints, dtype=np.int32), trt.PluginFieldType.INT32))
        elif a.type == T.FLOATS:
            fields.append(trt.PluginField(a.name, np.array(a.floats, dtype=np.float32), trt.PluginFieldType.FLOAT32))
        elif a.type == T.STRINGS:
            fields.append(trt.PluginField(a.name, b"".join(s + b"\0" for s in a.strings), trt.PluginFieldType.CHAR))
        else:
            raise ParserError(f"attributes of type {T.AttributeType.Name(a.type)} are unsupported as plugin fields")
    return fields


def import_plugin(trt, node: onnx.NodeProto):
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    version = attrs.get("plugin_version", b"1").decode()
    namespace = attrs.get("plugin_namespace", b"").decode()
    creator = trt.get_plugin_registry().get_creator(node.op_type, version, namespace)
    if creator is None:
        raise ParserError("Plugin not found, are the plugin name, version, and namespace correct?")
    fc = trt.PluginFieldCollection(parser_fields(trt, node, creator))
    return creator.create_plugin(node.op_type, namespace, fc, trt.TensorRTPhase.BUILD,
                                 trt.QuickPluginCreationRequest.UNKNOWN)


@dataclass
class PluginBuild:
    output_types: list
    output_shapes: list  # per output: list of IDimensionExpr
    launch: dict  # grid_x ... shared_mem -> IDimensionExpr
    extra_args: list  # IDimensionExpr per int32 scalar arg
    kernel_name: str
    ptx: bytes
    combination: tuple  # (types, formats) of inputs + outputs
    tactics: list = field(default_factory=list)  # what get_valid_tactics offered for that combination
    tactic: int = 0  # the tactic this build's kernel / launch parameters are for
    per_tactic: dict = field(default_factory=dict)  # tactic -> PluginBuild, every tactic the builder tried


class _Launch:
    pass


class _SymSetter:
    def __init__(self):
        self.nbSymExprs = 0
        self.exprs: dict[int, object] = {}

    def __setitem__(self, i, sym_expr):
        if i >= self.nbSymExprs:
            raise IndexError("symbolic extra arg index out of range")
        self.exprs[i] = sym_expr


def _dims_exprs(trt, shape) -> list:
    """Static dims -> constant expressions; a str names a runtime dimension."""
    b = trt.IExprBuilder()
    return [trt.runtime_dim(s) if isinstance(s, str) else b.constant(int(s)) for s in shape]


def _dyn_desc(trt, dtype, shape, fmt):
    d = trt.DynamicPluginTensorDesc()
    d.desc.dims = trt.Dims(-1 if isinstance(s, str) else s for s in shape)
    d.desc.type, d.desc.format = dtype, fmt
    return d


def build_plugin(trt, node: onnx.NodeProto, inputs: list[tuple[object, tuple]], tactic: int | None = None,
                 pick: Callable[[list[int]], int] = min) -> PluginBuild:
    """``inputs``: (DataType, shape) per plugin input, a shape entry being an int or a runtime-dim name.

    ``tactic``: build only that one (ParserError unless the configured combination offers it, or it is
    0 and none is offered); None: every offered tactic, the returned build being ``pick(tactics)``'s
    (all of them in ``per_tactic``)."""
    plugin = import_plugin(trt, node)
    if not isinstance(plugin, trt.IPluginV3QuickAOTBuild):
        raise ParserError(f"{node.op_type}: plugin is not an AOT plugin")
    in_types = [t for t, _ in inputs]
    out_types = plugin.get_output_data_types(in_types, [len(s) for _, s in inputs])
    builder = trt.IExprBuilder()
    in_dims = [trt.DimsExprs(_dims_exprs(trt, s)) for _, s in inputs]
    out_dims = plugin.get_output_shapes(in_dims, [], builder)
    out_shapes = [["?" if not e.is_constant() else e.get_constant_value() for e in d] for d in out_dims]
    nin, nio = len(inputs), len(inputs) + len(out_types)

    def io(types, formats):
        shapes = [s for _, s in inputs] + [[s if isinstance(s, int) else "?" for s in o] for o in out_shapes]
        return [_dyn_desc(trt, t, sh, f) for t, sh, f in zip(types, shapes, formats)]

    probe = io(in_types + list(out_types), [trt.TensorFormat.LINEAR] * nio)
    combos = plugin.get_supported_format_combinations(probe, nin)
    if len(combos) % nio:
        raise ParserError("format combinations are not a multiple of the I/O count")
    chosen = None
    for g in range(0, len(combos), nio):
        group = combos[g:g + nio]
        if [d.type for d in group[:nin]] == in_types:
            chosen = group
            break
    if chosen is None:
        raise ParserError(f"{node.op_type}: no supported format combination for input types {in_types}")
    types_, formats = [d.type for d in chosen], [d.format for d in chosen]
    if types_[nin:] != list(out_types):
        raise ParserError(f"{node.op_type}: combination output types {types_[nin:]} != declared {out_types}")
    desc = io(types_, formats)
    plugin.configure_plugin(desc[:nin], desc[nin:])
    tactics = plugin.get_valid_tactics()
    # AutoTuneCombination: "Each custom tactic must be a positive integer"; 0 is TensorRT's default tactic
    if any(not isinstance(t, int) or isinstance(t, bool) or t <= 0 for t in tactics):
        raise ParserError(f"{node.op_type}: custom tactics must be positive integers, got {tactics}")
    candidates = list(tactics) or [0]
    if tactic is not None and tactic not in candidates:
        raise ParserError(f"{node.op_type}: tactic {tactic} not offered for this combination ({candidates})")
    builds = {t: _build_tactic(trt, node, plugin, t, in_dims, desc, nin, builder, out_types, out_dims,
                               types_, formats, tactics)
              for t in ([tactic] if tactic is not None else candidates)}
    chosen_tactic = tactic if tactic is not None else pick(candidates)
    res = builds[chosen_tactic]
    res.per_tactic = builds
    return res


def _build_tactic(trt, node, plugin, tactic, in_dims, desc, nin, builder, out_types, out_dims, types_, formats,
                  tactics) -> PluginBuild:
    """One tactic of the timing pass: set it, ask for launch parameters + extra args, then the kernel."""
    plugin.set_tactic(tactic)
    launch, setter = _Launch(), _SymSetter()
    plugin.get_launch_params(in_dims, desc, nin, launch, setter, builder)
    lp = {}
    for f in ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem"):
        sym = getattr(launch, f)
        if not isinstance(sym, trt.ISymExpr) or sym.expr is None:
            raise ParserError(f"{node.op_type}: launch parameter {f} has no expression")
        lp[f] = sym.expr
    extra = []
    for i in range(setter.nbSymExprs):
        sym = setter.exprs.get(i)
        if sym is None or sym.expr is None or sym.dtype != trt.PluginArgDataType.INT32:
            raise ParserError(f"{node.op_type}: extra arg {i} is not an int32 expression")
        extra.append(sym.expr)
    name, ptx = plugin.get_kernel([d.desc for d in desc[:nin]], [d.desc for d in desc[nin:]])
    return PluginBuild(list(out_types), [list(d) for d in out_dims], lp, extra,
                       name.decode() if isinstance(name, bytes) else name, ptx, (tuple(types_), tuple(formats)),
                       list(tactics), tactic)


# ----------------------------------------------------------------------------- network / parser / builder
class _Input:
    def __init__(self, name: str, shape: tuple, dtype):
        self.name, self.shape, self.dtype = name, shape, dtype


class Network:
    def __init__(self, trt, flags: int):
        self.trt, self.flags = trt, flags
        self.inputs: list[_Input] = []
        self.plugin_layers: list[tuple[onnx.NodeProto, object]] = []
        self.function_layers: list[onnx.NodeProto] = []
        self.model: onnx.ModelProto | None = None  # what the parser read (the engine double runs it)

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Input:
        return self.inputs[i]

    def has_flag(self, flag) -> bool:
        return bool(self.flags & (1 << flag.value))


class OnnxParser:
    """onnx-tensorrt >= 10.10: a node outside the ONNX domains becomes a plugin when the registry holds
    (op_type, plugin_version, plugin_namespace) (preferred over a model-local function since 10.7),
    else its local function, else an error."""

    def __init__(self, network: Network, logger):
        self.network, self.errors = network, []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        trt = self.network.trt
        model = onnx.load(path)
        self.network.model = model
        elem = {onnx.TensorProto.INT64: trt.int64, onnx.TensorProto.INT32: trt.int32,
                onnx.TensorProto.FLOAT: trt.float32, onnx.TensorProto.FLOAT16: trt.float16,
                onnx.TensorProto.BFLOAT16: trt.bfloat16}
        inits = {t.name for t in model.graph.initializer}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
            self.network.inputs.append(_Input(vi.name, shape, elem[tt.elem_type]))
        functions = {(f.domain, f.name) for f in model.functions}
        flag = trt.NetworkDefinitionCreationFlag
        qpcr = trt.QuickPluginCreationRequest
        pref = (qpcr.PREFER_AOT if self.network.has_flag(flag.PREFER_AOT_PYTHON_PLUGINS)
                else qpcr.PREFER_JIT if self.network.has_flag(flag.PREFER_JIT_PYTHON_PLUGINS) else qpcr.UNKNOWN)
        for node in model.graph.node:
            if node.domain in ("", "ai.onnx", "ai.onnx.ml"):
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            version = attrs.get("plugin_version", b"1").decode()
            namespace = attrs.get("plugin_namespace", b"").decode()
            creator = trt.get_plugin_registry().get_creator(node.op_type, version, namespace)
            if creator is not None:
                fc = trt.PluginFieldCollection(parser_fields(trt, node, creator))
                self.network.plugin_layers.append(
                    (node, creator.create_plugin(node.op_type, namespace, fc, trt.TensorRTPhase.BUILD, pref)))
            elif (node.domain, node.op_type) in functions:
                self.network.function_layers.append(node)
            else:
                self.errors.append(f"{node.name} [{node.op_type}]: Plugin not found, are the plugin name, version, "
                                   "and namespace correct?")
        return not self.errors


class Profile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, min, opt, max) -> None:  # noqa: A002
        lo, mid, hi = tuple(min), tuple(opt), tuple(max)
        if not (len(lo) == len(mid) == len(hi)) or any(not (a <= b <= c) for a, b, c in zip(lo, mid, hi)):
            raise ValueError(f"profile for {name}: need min <= opt <= max, got {lo} {mid} {hi}")
        self.shapes[name] = (lo, mid, hi)


class BuilderConfig:
    def __init__(self, trt):
        self.trt, self.flags, self.pools, self.profiles = trt, set(), {}, []
        self._timing_cache, self._monitor = None, None

    def create_timing_cache(self, serialized) -> object:
        return self.trt.ITimingCache(bytes(serialized))

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, self.trt.ITimingCache) or not isinstance(ignore_mismatch, bool):
            raise TypeError(f"set_timing_cache(): incompatible arguments {cache!r}, {ignore_mismatch!r}")
        self._timing_cache = cache
        return True

    def get_timing_cache(self):
        return self._timing_cache

    @property
    def progress_monitor(self):
        return self._monitor

    @progress_monitor.setter
    def progress_monitor(self, monitor) -> None:
        if monitor is not None and not (isinstance(monitor, self.trt.IProgressMonitor)
                                        and getattr(monitor, "_trt_initialised", False)):
            raise TypeError("progress_monitor must be an IProgressMonitor whose __init__ called "
                            "IProgressMonitor.__init__(self)")
        self._monitor = monitor

    def set_flag(self, flag) -> None:
        if not isinstance(flag, self.trt.BuilderFlag):
            raise TypeError(f"set_flag(): incompatible argument {flag!r}")
        self.flags.add(flag)

    def set_memory_pool_limit(self, pool, size: int) -> None:
        if not isinstance(pool, self.trt.MemoryPoolType):
            raise TypeError(f"set_memory_pool_limit(): incompatible argument {pool!r}")
        self.pools[pool] = int(size)

    def add_optimization_profile(self, profile: Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger):
        import tensorrt as trt  # the double in sys.modules

        self.trt, self.logger = trt, logger

    def create_network(self, flags: int = 0) -> Network:
        return Network(self.trt, flags)

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig(self.trt)

    def create_optimization_profile(self) -> Profile:
        return Profile()

    def build_serialized_network(self, network: Network, config: BuilderConfig):
        """None (TensorRT logs why) when a dynamic input has no profile; else plan bytes."""
        for inp in network.inputs:
            if any(s < 0 for s in inp.shape) and not all(inp.name in p.shapes for p in config.profiles or [Profile()]):
                return None
        mon = config.progress_monitor
        if mon is not None:
            mon.phase_start("Building engine", None, 1)
            if mon.step_complete("Building engine", 0) is False:  # the monitor cancelled the build
                return None
            mon.phase_finish("Building engine")
        if config.get_timing_cache() is not None:  # tactics timed in this build join the cache
            cache = config.get_timing_cache()
            cache.entries += b"timed:" + str(len(network.plugin_layers)).encode() + b";"
        self.trt.builds.append((network, config))
        from .engine import serialize_plan

        return memoryview(serialize_plan(network, config))
