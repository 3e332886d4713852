"""The smlp plugins through TensorRT's plugin contract, without TensorRT or a GPU.

``tests/trt_double`` stands in for TensorRT's compiled bindings, re-implements the pure-Python
``tensorrt.plugin`` layer's semantics, and plays the ONNX parser + builder (fields encoded as
onnx-tensorrt encodes them: INT -> int32[1], STRING -> bytes + NUL, numpy >= 2.4 scalar rules).
Every plugin folder x fp32/fp16/bf16 x every mode is registered, created from parser-encoded
fields, asked for its output types / shapes / formats (the grouped GEMM's ``@autotune``: exactly its
type combinations, each with tactics 1-3), and (``triton`` marker) run through ``aot_impl`` for every
dtype and tactic down to the kernel name, the real Triton PTX (sm_90, and sm_80), the tactic's
tiles, the launch parameters and the int32 scalar args, evaluated at concrete shapes.

Set ``SMLP_TRT_PLUGIN_SRC`` to a directory with NVIDIA's ``tensorrt/plugin/*.py`` to run the same
tests on the real Python layer over the bindings double (see tests/trt_double/__init__.py).
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import helper

from smlp_export.export.contract import CONTRACTS
from smlp_export import engine_plan as plan
from smlp_plugins import _common, _fields, build_engine

from . import trt_double
from .trt_double import bindings
from .trt_double.builder import ParserError, build_plugin, import_plugin

FOLDERS = {"SMLPSpatialMoE": "smlp_spatial_moe",
           "SMLPSpatialMoEPartial": "smlp_spatial_moe_partial", "SMLPGroupedExpertGemm": "smlp_grouped_gemm"}
DT = bindings.DataType
DTYPES = {"fp32": DT.FLOAT, "fp16": DT.HALF, "bf16": DT.BF16}


def plugin_module(op_type: str):
    return importlib.import_module(f"smlp_plugins.{FOLDERS[op_type]}.plugin")


@dataclass(frozen=True)
class Case:
    """One plugin node: its fields, its inputs (dtype or None = the case's dtype; shape with str =
    runtime dimension), the runtime sizes to evaluate at, and what the kernel must get."""
    op_type: str
    mode: str
    fields: dict
    inputs: tuple
    env: dict
    out_shape: tuple  # evaluated at env
    extra: tuple  # int32 scalar args, evaluated at env


def _cases() -> list[Case]:
    # Token routing (base, topk k=1/2) is standard ONNX ops in the tensorrt graph; its plugin is the
    # grouped GEMM below (test_tensorrt_export.py covers the routing modes end to end).
    E = 4
    cases = []
    B, T, c, n = "B", "T", 24, 64
    cases.append(Case("SMLPSpatialMoE", "deterministic", {"num_experts": E},
                      ((None, (B, T, c)), (None, (E, n, n)), (None, (E, n))), {"B": 3, "T": 50}, (3, 50, c),
                      (50, c, n)))
    cases.append(Case("SMLPSpatialMoEPartial", "partial", {"num_experts": E, "prefix": 13},
                      ((None, (B, T, c)), (None, (E, n, n)), (None, (E, n)), (None, (13, E))), {"B": 2, "T": 61},
                      (2, 61, c), (61, c, n)))
    M, K, Ng = "M", 40, 72
    for act in ("identity", "gelu", "gelu_tanh", "relu", "silu"):
        cases.append(Case("SMLPGroupedExpertGemm", act, {"activation": act},
                          ((None, (M, K)), (DT.INT32, (E + 1,)), (None, (E, Ng, K)), (None, (E, Ng))),
                          {"M": 29}, (29, Ng), (29,)))
    return cases


CASES = _cases()
assert {c.op_type for c in CASES} == set(CONTRACTS), "a contract without a case here"


def node_for(case: Case) -> onnx.NodeProto:
    """The node as the exporter writes it (contract attributes + plugin_namespace / plugin_version)."""
    c = CONTRACTS[case.op_type]
    return helper.make_node(case.op_type, [f"in{i}" for i in range(len(case.inputs))], ["out"], domain=c.domain,
                            name=f"/blocks.0/{case.op_type}", plugin_namespace=c.namespace,
                            plugin_version=c.version, **case.fields)


def inputs_for(case: Case, dtype) -> list:
    return [(t or dtype, shape) for t, shape in case.inputs]


@pytest.fixture
def trt(monkeypatch):
    """A fresh TensorRT double with the smlp plugins registered."""
    mod = trt_double.install(monkeypatch)
    build_engine.register_plugins()
    return mod


# ----------------------------------------------------------------------------- registration
def test_register_every_plugin_with_contract_fields(monkeypatch):
    trt = trt_double.install(monkeypatch)
    done = build_engine.register_plugins()
    assert sorted(done) == sorted(CONTRACTS)
    want_type = {int: trt.PluginFieldType.INT32, str: trt.PluginFieldType.CHAR}
    for c in CONTRACTS.values():
        creator = trt.get_plugin_registry().get_creator(c.op_type, c.version, c.namespace)
        assert creator is not None, c.op_type
        assert [(f.name, f.type) for f in creator.field_names] == [(n, want_type[t]) for n, t in c.attributes.items()]


def test_registering_twice_in_one_process_keeps_one_registration(monkeypatch):
    trt = trt_double.install(monkeypatch)
    build_engine.register_plugins()
    first = {c: trt.get_plugin_registry().get_creator(c, "1", "smlp") for c in CONTRACTS}
    build_engine.register_plugins()  # a second engine build in the same process
    for mod in (plugin_module(o) for o in CONTRACTS):
        mod.register()
    assert {c: trt.get_plugin_registry().get_creator(c, "1", "smlp") for c in CONTRACTS} == first


def test_tensorrt_older_than_10_10_is_one_clear_error(monkeypatch):
    trt_double.install(monkeypatch, version="10.9.0.34")
    with pytest.raises(_common.TensorRTUnavailable, match=r"TensorRT 10\.9\.0\.34 found: .*>= 10\.10") as e:
        build_engine.register_plugins()
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- fields
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op_type}-{c.mode}" for c in CASES])
def test_plugin_from_parser_fields_declares_outputs(trt, case, dtype):
    """Creation from the parser's encoding, output types (with fake shapes), output shapes."""
    node = node_for(case)
    plugin = import_plugin(trt, node)
    assert isinstance(plugin, trt.IPluginV3QuickAOTBuild)  # only aot_impl: TensorRT picks AOT
    ins = inputs_for(case, DTYPES[dtype])
    assert plugin.get_output_data_types([t for t, _ in ins], [len(s) for _, s in ins]) == [DTYPES[dtype]]
    b = trt.IExprBuilder()
    dims = [trt.DimsExprs([trt.runtime_dim(s) if isinstance(s, str) else b.constant(s) for s in shape])
            for _, shape in ins]
    (out,) = plugin.get_output_shapes(dims, [], b)
    assert tuple(bindings.evaluate(e, case.env) for e in out) == case.out_shape


def test_parser_encodes_fields_like_onnx_tensorrt(trt):
    """The double's encoding itself: INT -> int32[1] (int() raises, numpy >= 2.4), STRING + NUL."""
    from .trt_double.builder import parser_fields

    gemm = next(c for c in CASES if c.op_type == "SMLPGroupedExpertGemm" and c.mode == "gelu")
    creator = trt.get_plugin_registry().get_creator("SMLPGroupedExpertGemm", "1", "smlp")
    got = {f.name: f for f in parser_fields(trt, node_for(gemm), creator)}
    assert got["activation"].type == trt.PluginFieldType.CHAR and got["activation"].data.tobytes() == b"gelu\0"
    assert got["activation"].length == 5
    part = next(c for c in CASES if c.op_type == "SMLPSpatialMoEPartial")
    creator = trt.get_plugin_registry().get_creator("SMLPSpatialMoEPartial", "1", "smlp")
    got = {f.name: f for f in parser_fields(trt, node_for(part), creator)}
    p = got["prefix"].data
    assert p.dtype == np.int32 and p.shape == (1,) and p[0] == 13
    with pytest.raises(TypeError, match="0-dimensional"):
        int(p)


@pytest.mark.parametrize("raw,want", [("silu\0", "silu"), ("silu", "silu"), (b"gelu\0", "gelu")])
def test_decode_string_field_strips_one_nul(raw, want):
    assert _fields.decode_field(CONTRACTS["SMLPGroupedExpertGemm"], "activation", raw) == want


@pytest.mark.parametrize("raw", ["silu\0\0", "si\0lu", "silu\x01", "sílu"])
def test_decode_string_field_rejects_other_garbage(raw):
    with pytest.raises(ValueError, match="SMLPGroupedExpertGemm.activation: malformed string field"):
        _fields.decode_field(CONTRACTS["SMLPGroupedExpertGemm"], "activation", raw)


def test_decode_int_field():
    c = CONTRACTS["SMLPSpatialMoEPartial"]
    arr = np.array([13], dtype=np.int32).view(bindings.Numpy24Array)
    assert _fields.decode_field(c, "prefix", arr) == 13 and type(_fields.decode_field(c, "prefix", arr)) is int
    assert _fields.decode_field(c, "prefix", 7) == 7
    with pytest.raises(ValueError, match="expected one int, got 2 values"):
        _fields.decode_field(c, "prefix", np.array([1, 2], dtype=np.int32))
    with pytest.raises(ValueError, match="expected int"):
        _fields.decode_field(c, "prefix", "13")


def test_wrong_field_value_is_refused_at_build(trt):
    case = next(c for c in CASES if c.op_type == "SMLPGroupedExpertGemm")
    node = node_for(Case(case.op_type, case.mode, {**case.fields, "activation": "swish"}, case.inputs, case.env,
                         case.out_shape, case.extra))
    plugin = import_plugin(trt, node)
    ins = inputs_for(case, DT.HALF)
    plugin.get_output_data_types([t for t, _ in ins], [len(s) for _, s in ins])
    with pytest.raises(ValueError, match="activation 'swish'"):
        build_plugin(trt, node, ins)


def test_missing_plugin_is_a_parser_error(trt):
    node = helper.make_node("SMLPNoSuchPlugin", ["a"], ["b"], domain="smlp", plugin_namespace="smlp")
    with pytest.raises(ParserError, match="Plugin not found"):
        import_plugin(trt, node)


def test_constant_reads_shape_expr_constant_value_method(trt):
    """tensorrt.plugin's ShapeExpr: is_constant property, constant_value() method."""
    trtp = trt.plugin
    assert _common.constant(trtp.ShapeExpr(trt.IExprBuilder().constant(96)), "w") == 96
    with pytest.raises(ValueError, match="w must be a build-time constant"):
        _common.constant(trtp.ShapeExpr(trt.runtime_dim("T")), "w")


# ----------------------------------------------------------------------------- AOT
_PTX_CACHE: dict = {}
# (kernel, dtype, arch, constexprs, num_warps, ptx_version, num_stages) of every compile asked for
COMPILED: list = []


def _key(kernel, dtype, arch, constexprs, num_warps=4, ptx_version=80, num_stages=3) -> tuple:
    return (kernel, dtype, arch, tuple(sorted(constexprs.items())), num_warps, ptx_version, num_stages)


def _cached_compile(real):
    """compile_ptx with a per-session cache (a miss compiles for real)."""
    def compile_ptx(kernel, dtype, arch, constexprs, num_warps=4, ptx_version=80, num_stages=3):
        key = _key(kernel, dtype, arch, constexprs, num_warps, ptx_version, num_stages)
        COMPILED.append(key)
        if key not in _PTX_CACHE:
            _PTX_CACHE[key] = real(kernel, dtype, arch, constexprs, num_warps=num_warps, ptx_version=ptx_version,
                                   num_stages=num_stages)
        return _PTX_CACHE[key]
    return compile_ptx


class _Asked(Exception):
    pass


@pytest.fixture(scope="module")
def ptx_prewarmed():
    """Compile every kernel the AOT matrix's plugins ask for in ONE batch (one process under the
    interpreter instead of one per kernel): a first pass records each plugin's compile request and
    stops there; the batch result fills the cache the tests then read."""
    pytest.importorskip("triton", reason="triton extra not installed: pip install -e '.[triton]'")
    from smlp_export.kernels import aot

    asked = []

    def record(kernel, dtype, arch, constexprs, num_warps=4, ptx_version=80, num_stages=3):
        asked.append(_key(kernel, dtype, arch, constexprs, num_warps, ptx_version, num_stages))
        raise _Asked

    with pytest.MonkeyPatch.context() as mp:
        for case, dtype, arch, tactic in AOT_MATRIX:
            trt = trt_double.install(mp)
            build_engine.register_plugins()
            mp.setattr(_common, "gpu_arch", lambda: arch)
            mp.setattr(aot, "compile_ptx", record)
            with pytest.raises(_Asked):
                build_plugin(trt, node_for(case), inputs_for(case, DTYPES[dtype]), tactic=tactic)
    todo = sorted({k for k in asked if k not in _PTX_CACHE})
    specs = [aot.plugin_spec(k[0], k[1], k[2], dict(k[3]), k[4], k[5], k[6]) for k in todo]
    _PTX_CACHE.update(zip(todo, aot.compile_specs(specs)))


# The grouped GEMM's custom tactics (its @autotune); the spatial plugins offer none: TensorRT's default 0.
GEMM_TACTICS = (1, 2, 3)
TACTICS_OF = {"SMLPSpatialMoE": (0,), "SMLPSpatialMoEPartial": (0,), "SMLPGroupedExpertGemm": GEMM_TACTICS}
# (case, dtype, arch, tactic); every dtype x every tactic on the gelu case, other activations on the decode
# tactic (the activation changes one constexpr, not the tiles)
AOT_MATRIX = [(case, dtype, 90, t) for case in CASES for dtype in sorted(DTYPES)
              for t in (TACTICS_OF[case.op_type] if case.mode == "gelu" else TACTICS_OF[case.op_type][:1])]
# sm_80 (A100): every plugin and dtype, one mode each (the arch changes the PTX, not the plugin glue)
AOT_MATRIX += [(case, dtype, 80, TACTICS_OF[case.op_type][-1]) for case in CASES
               if case.mode in ("topk2", "deterministic", "partial", "gelu") for dtype in sorted(DTYPES)]

# What each grouped GEMM tactic must compile for the cases' weight [N=72, K=40] (written out from
# configs.grouped_gemm_blocks' documented regimes, BLOCK_N / BLOCK_K capped at next_pow2(72) = 128 /
# next_pow2(40) = 64): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), grid_x = cdiv(72, BLOCK_N).
GEMM_TILES = {
    (1, "fp32"): (16, 16, 64, 4, 4), (1, "fp16"): (16, 16, 64, 4, 4), (1, "bf16"): (16, 16, 64, 4, 4),  # decode
    (2, "fp32"): (64, 64, 32, 4, 4), (2, "fp16"): (64, 64, 64, 4, 4), (2, "bf16"): (64, 64, 64, 4, 4),  # small
    (3, "fp32"): (128, 128, 32, 8, 3), (3, "fp16"): (128, 128, 64, 8, 3), (3, "bf16"): (128, 128, 64, 8, 3),
}


@pytest.mark.triton
@pytest.mark.parametrize("case,dtype,arch,tactic", AOT_MATRIX,
                         ids=[f"{c.op_type}-{c.mode}-{d}-sm{a}-t{t}" for c, d, a, t in AOT_MATRIX])
def test_aot_impl_kernel_ptx_launch_and_scalar_args(trt, monkeypatch, ptx_prewarmed, case, dtype, arch, tactic):
    from smlp_export.kernels import aot

    monkeypatch.setattr(_common, "gpu_arch", lambda: arch)
    monkeypatch.setattr(aot, "compile_ptx", _cached_compile(aot.compile_ptx))
    node = node_for(case)
    before = len(COMPILED)
    res = build_plugin(trt, node, inputs_for(case, DTYPES[dtype]), tactic=tactic)
    assert len(COMPILED) == before + 1
    # the tactics TensorRT is offered for the configured combination, and the one this kernel is for
    assert sorted(res.tactics) == [t for t in TACTICS_OF[case.op_type] if t] and res.tactic == tactic
    kernel, kdtype, karch, constexprs, num_warps, _, num_stages = COMPILED[-1]
    constexprs = dict(constexprs)
    ck = _PTX_CACHE[COMPILED[-1]]
    # the kernel the contract names, compiled for this build's dtype and GPU
    assert kdtype == {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype] and karch == arch
    assert res.kernel_name == aot.PLUGIN_KERNELS[kernel][0] == ck.name
    ptx = res.ptx.decode()
    assert f".entry {res.kernel_name}(" in ptx and f".target sm_{arch}" in ptx
    # parameter layout TensorRT launches with: input pointers, int32 extra args, output pointers (+ scratch)
    entry = ptx[ptx.index(f".entry {res.kernel_name}("):]
    kinds = re.findall(r"\.param\s+(\.\w+)", entry[:entry.index(")")])
    n_in, n_extra = len(case.inputs), len(res.extra_args)
    assert kinds == [".u64"] * n_in + [".u32"] * n_extra + [".u64"] + [".u64"] * aot.SCRATCH_PARAMS
    assert ck.global_scratch == 0 and ck.profile_scratch == 0
    # types / formats TensorRT configures: network input types, declared output type, LINEAR
    assert res.combination[0] == tuple(t for t, _ in inputs_for(case, DTYPES[dtype])) + (DTYPES[dtype],)
    assert set(res.combination[1]) == {trt.TensorFormat.LINEAR}
    assert res.output_types == [DTYPES[dtype]]
    # scalar args and launch parameters at concrete runtime sizes
    ev = {k: bindings.evaluate(e, case.env) for k, e in res.launch.items()}
    assert tuple(bindings.evaluate(e, case.env) for e in res.extra_args) == case.extra
    assert (ev["block_x"], ev["block_y"], ev["block_z"]) == (32 * num_warps, 1, 1) == (ck.block_x, 1, 1)
    assert ev["shared_mem"] == ck.shared
    grid = (ev["grid_x"], ev["grid_y"], ev["grid_z"])
    assert grid == expected_grid(case, constexprs)
    if case.op_type == "SMLPGroupedExpertGemm":  # the tactic's tiles, warps, stages, and the grid they need
        bm, bn, bk, warps, stages = GEMM_TILES[(tactic, dtype)]
        assert (constexprs["BLOCK_M"], constexprs["BLOCK_N"], constexprs["BLOCK_K"]) == (bm, bn, bk)
        assert (num_warps, num_stages) == (warps, stages) and ck.num_warps == warps
        assert grid == (math.ceil(72 / bn), 4, 1)


def expected_grid(case: Case, cx: dict) -> tuple:
    """The grid each kernel's indexing needs (from the kernels' docstrings), at the case's sizes."""
    env = case.env
    if case.op_type == "SMLPSpatialMoE":
        c, E = case.inputs[0][1][2], cx["E"]
        return (math.ceil(env["T"] / cx["BLOCK_M"]), math.ceil(c // E / cx["BLOCK_N"]), env["B"] * E)
    if case.op_type == "SMLPSpatialMoEPartial":
        c = case.inputs[0][1][2]
        return (math.ceil(env["T"] / cx["BLOCK_M"]), math.ceil(c / cx["BLOCK_N"]), env["B"])
    N = case.inputs[2][1][1]
    return (math.ceil(N / cx["BLOCK_N"]), cx["E"], 1)  # one program per (N tile, expert)


@pytest.mark.triton
def test_aot_refuses_kernel_that_needs_scratch(trt, monkeypatch, ptx_prewarmed):
    """A kernel needing Triton scratch memory would read a garbage pointer under TensorRT: build error."""
    import dataclasses

    from smlp_export.kernels import aot

    cached = _cached_compile(aot.compile_ptx)
    monkeypatch.setattr(aot, "compile_ptx",
                        lambda *a, **k: dataclasses.replace(cached(*a, **k), global_scratch=256))
    case = CASES[-1]
    with pytest.raises(RuntimeError, match="needs Triton scratch memory"):
        build_plugin(trt, node_for(case), inputs_for(case, DT.HALF))


@pytest.mark.triton
def test_grouped_gemm_activation_codes_match_the_kernels():
    pytest.importorskip("triton", reason="triton extra not installed")
    from smlp_export.kernels.grouped_moe import ACTIVATIONS
    from smlp_export.ops.grouped_gemm import GEMM_ACTIVATIONS

    gg = plugin_module("SMLPGroupedExpertGemm")
    assert {k: v for k, v in gg.ACTIVATIONS.items() if k != "identity"} == ACTIVATIONS
    assert gg.ACTIVATIONS["identity"] == 4 and set(gg.ACTIVATIONS) == set(GEMM_ACTIVATIONS)


# ----------------------------------------------------------------------------- autotune: types, formats, tactics
GEMM_CASE = next(c for c in CASES if c.op_type == "SMLPGroupedExpertGemm" and c.mode == "gelu")


def _offered(trt, case: Case, dtype) -> tuple:
    """(plugin, [(types, formats) per offered combination]) as TensorRT's builder sees them."""
    plugin = import_plugin(trt, node_for(case))
    ins = inputs_for(case, dtype)
    outs = plugin.get_output_data_types([t for t, _ in ins], [len(s) for _, s in ins])
    b = trt.IExprBuilder()
    dims = [trt.DimsExprs([trt.runtime_dim(x) if isinstance(x, str) else b.constant(x) for x in shape])
            for _, shape in ins]
    plugin.get_output_shapes(dims, [], b)
    probe = []
    for t, shape in [*ins, (outs[0], ("M", 72))]:
        d = trt.DynamicPluginTensorDesc()
        d.desc.dims = trt.Dims(-1 if isinstance(x, str) else x for x in shape)
        d.desc.type, d.desc.format = t, trt.TensorFormat.LINEAR
        probe.append(d)
    flat = plugin.get_supported_format_combinations(probe, len(ins))
    nio = len(probe)
    assert len(flat) % nio == 0
    groups = [flat[i:i + nio] for i in range(0, len(flat), nio)]
    return plugin, probe, [(tuple(d.type for d in g), tuple(d.format for d in g)) for g in groups]


@pytest.mark.parametrize("network_dtype", sorted(DTYPES))
def test_grouped_gemm_offers_exactly_the_supported_combinations_with_its_tactics(trt, network_dtype):
    """x / weight / bias / output all fp32, all fp16 or all bf16, offsets int32, LINEAR: three
    combinations whatever the network's dtype, each with tactics 1-3 (decode, small, large prefill)."""
    plugin, probe, offered = _offered(trt, GEMM_CASE, DTYPES[network_dtype])
    lin = (trt.TensorFormat.LINEAR,) * 5
    assert sorted(offered, key=str) == sorted([((d, DT.INT32, d, d, d), lin) for d in DTYPES.values()], key=str)
    for types_, _ in offered:
        for d, t in zip(probe, types_):
            d.desc.type = t
        plugin.configure_plugin(probe[:4], probe[4:])
        assert sorted(plugin.get_valid_tactics()) == list(GEMM_TACTICS)


@pytest.mark.parametrize("what,inputs", [
    ("offsets fp32", ((DT.HALF, ("M", 40)), (DT.FLOAT, (5,)), (DT.HALF, (4, 72, 40)), (DT.HALF, (4, 72)))),
    ("offsets int64", ((DT.HALF, ("M", 40)), (DT.INT64, (5,)), (DT.HALF, (4, 72, 40)), (DT.HALF, (4, 72)))),
    ("weight fp32, x fp16", ((DT.HALF, ("M", 40)), (DT.INT32, (5,)), (DT.FLOAT, (4, 72, 40)), (DT.HALF, (4, 72)))),
    ("bias bf16, x fp16", ((DT.HALF, ("M", 40)), (DT.INT32, (5,)), (DT.HALF, (4, 72, 40)), (DT.BF16, (4, 72)))),
])
def test_grouped_gemm_unsupported_type_combination_is_not_offered(trt, what, inputs):
    """The builder finds no combination for these network types: nothing reaches aot_impl."""
    node = node_for(GEMM_CASE)
    with pytest.raises(ParserError, match="no supported format combination"):
        build_plugin(trt, node, list(inputs))


def test_grouped_gemm_tile_config_per_tactic():
    """Tactic -> tiles at the H200 audit shape (d=4096, f=14336, bf16) and the default tactic 0."""
    gg = plugin_module("SMLPGroupedExpertGemm")
    up = {t: gg.tile_config(t, 14336, 4096, "bfloat16").as_dict() for t in GEMM_TACTICS}
    # decode: 16-row tile, BLOCK_N shrunk until one expert gives >= 264 programs (2 per SM on 132 SMs)
    assert up[1] == {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    assert math.ceil(14336 / up[1]["BLOCK_N"]) >= 264
    assert up[2] == {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    assert up[3] == {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    # 0 = TensorRT's default tactic (only set when no custom tactic is offered): the small-prefill tiles
    assert gg.tile_config(0, 14336, 4096, "bfloat16") == gg.tile_config(2, 14336, 4096, "bfloat16")
    with pytest.raises(ValueError, match="tactic 4 was never offered"):
        gg.tile_config(4, 14336, 4096, "bfloat16")


def test_autotune_combination_expansion_follows_tensorrt(trt):
    """AutoTuneCombination semantics (the double's, or NVIDIA's with SMLP_TRT_PLUGIN_SRC): '|' dependent,
    '*' independent, single options everywhere, FP32 / FP16 / DataType names, one layout for all."""
    A = trt.plugin.AutoTuneCombination
    F, H, B, I = DT.FLOAT, DT.HALF, DT.BF16, DT.INT32
    got = [c.types for c in A("FP32|FP16, FP32|FP16, FP32*FP16", "LINEAR", [1, 2])._get_combinations()]
    assert got == [[F, F, F], [H, H, F], [F, F, H], [H, H, H]]  # TensorRT's documented example, in order
    combos = A("FP32|FP16|BF16, INT32, FP32|FP16|BF16", "LINEAR", [3, 1])._get_combinations()
    assert [c.types for c in combos] == [[F, I, F], [H, I, H], [B, I, B]]
    assert all(c.layouts == [trt.TensorFormat.LINEAR] * 3 and list(c.tactics) == [3, 1] for c in combos)
    c = A()
    c.pos([0, 2], "FP16|BF16")
    c.pos([1], "INT32")
    c.tactics([5])
    assert [x.types for x in c._get_combinations()] == [[H, I, H], [B, I, B]]
    with pytest.raises(ValueError, match="already specified"):
        c.pos([1], "INT64")
    with pytest.raises(ValueError, match="illegal dependent lengths"):
        A("FP32|FP16, FP32|FP16|BF16")._get_combinations()
    with pytest.raises(ValueError, match="both"):
        A("FP32|FP16, FP32*FP16|BF16")._get_combinations()
    with pytest.raises(AttributeError):
        A("FP64, FP32")._get_combinations()


def test_autotune_declaration_rules(trt):
    """@autotune: names (inputs, a subset of the fields in order, outputs) and return annotation checked."""
    trtp = trt.plugin
    qn = CONTRACTS["SMLPGroupedExpertGemm"].qualified_name
    D, L = trtp.TensorDesc, list[trtp.AutoTuneCombination]
    tensors = {"x": D, "offsets": D, "weight": D, "bias": D}

    def declared(params: dict, ret=L):
        def fn(*args):
            return []
        fn.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                                annotation=a) for n, a in params.items()],
                                             return_annotation=ret)
        return fn

    fine = declared({**tensors, "activation": _fields.FIELD_ANNOTATIONS[str], "outputs": tuple[D]})
    no_outputs = declared(tensors)
    wrong_return = declared({**tensors, "outputs": tuple[D]}, ret=int)
    unknown_attr = declared({**tensors, "k": int, "outputs": tuple[D]})
    wrong_field_type = declared({**tensors, "activation": int, "outputs": tuple[D]})
    tactic_param = declared({**tensors, "outputs": tuple[D], "tactic": int})
    trtp.autotune(qn)(fine)
    for bad in (no_outputs, wrong_return, unknown_attr, wrong_field_type, tactic_param):
        with pytest.raises(ValueError):
            trtp.autotune(qn)(bad)


@pytest.mark.triton
def test_builder_times_every_tactic_of_the_configured_combination(trt, monkeypatch, ptx_prewarmed):
    """The timing pass: each offered tactic set in turn, each with its own kernel / launch; the engine keeps
    the one the builder picks (the double picks by ``pick``: it cannot time)."""
    from smlp_export.kernels import aot

    monkeypatch.setattr(_common, "gpu_arch", lambda: 90)
    monkeypatch.setattr(aot, "compile_ptx", _cached_compile(aot.compile_ptx))
    res = build_plugin(trt, node_for(GEMM_CASE), inputs_for(GEMM_CASE, DT.HALF), pick=max)
    assert sorted(res.per_tactic) == list(GEMM_TACTICS) and res.tactic == 3 and res is res.per_tactic[3]
    for t, b in res.per_tactic.items():
        assert b.tactic == t and b.combination[0] == (DT.HALF, DT.INT32, DT.HALF, DT.HALF, DT.HALF)
        assert bindings.evaluate(b.launch["grid_x"], GEMM_CASE.env) == math.ceil(72 / GEMM_TILES[(t, "fp16")][1])
        assert bindings.evaluate(b.launch["block_x"], GEMM_CASE.env) == 32 * GEMM_TILES[(t, "fp16")][3]
    assert len({b.ptx for b in res.per_tactic.values()}) == 3  # three different kernels
    with pytest.raises(ParserError, match="tactic 0 not offered"):
        build_plugin(trt, node_for(GEMM_CASE), inputs_for(GEMM_CASE, DT.HALF), tactic=0)


# ----------------------------------------------------------------------------- build_engine end to end
@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    """A micro model exported with --target tensorrt (plugin nodes + their fallback functions)."""
    from smlp_export import save_checkpoint
    from smlp_export.export.pipeline import export_model

    from .conftest import micro_model

    tmp = tmp_path_factory.mktemp("trt_export")
    ck = save_checkpoint(micro_model(**{"token_routing": "topk", "top_k": 2}), tmp / "ck")
    export_model(str(ck), tmp / "out", target="tensorrt", validate=False)
    return tmp / "out"


def test_build_engine_end_to_end_on_the_double(monkeypatch, trt_export):
    """build_engine on a real export: every plugin node is created from the parser's fields (not
    its fallback function), the builder flags exist, and the sequence bound is the model's n."""
    trt = trt_double.install(monkeypatch)
    model = onnx.load(trt_export / "model.onnx")
    plugin_nodes = [n for n in model.graph.node if n.op_type in CONTRACTS]
    assert plugin_nodes, "the tensorrt export has no plugin node"
    n = json.loads((trt_export / "manifest.json").read_text())["config"]["max_seq_len"]
    out = build_engine.build_engine(trt_export / "model.onnx", trt_export / "model.engine", precision="fp16")
    assert out.read_bytes().startswith(b"smlp-trt-double-plan:")
    assert not list(trt_export.glob("*.tmp"))
    (network, config), = trt.builds
    assert [node.name for node, _ in network.plugin_layers] == [node.name for node in plugin_nodes]
    assert not network.function_layers
    assert all(isinstance(p, trt.IPluginV3QuickAOTBuild) for _, p in network.plugin_layers)
    assert config.flags == {trt.BuilderFlag.FP16}
    prefill, decode = config.profiles
    lo, opt, hi = prefill.shapes["input_ids"]
    assert hi == (8, n) and lo == (1, 1)
    assert decode.shapes["input_ids"] == ((1, 1), (4, 1), (8, 1))
    assert json.loads((trt_export / "model.engine.json").read_text())["precision"] == "fp16"
    # the smlp-build-engine path: timing cache read and written back, progress reported
    cache = trt_export / "timing.cache"
    cache.write_bytes(b"old;")
    seen = []

    class Printer(plan.ProgressPrinter):
        def phase_start(self, name, parent, steps):
            seen.append(name)

    manifest = json.loads((trt_export / "manifest.json").read_text())
    build_engine.build_engine_with_profiles(
        trt_export / "model.onnx", trt_export / "model3.engine", profiles=plan.engine_profiles(manifest),
        export_manifest=manifest, timing_cache=str(cache), printer=Printer())
    assert cache.read_bytes().startswith(b"old;timed:") and seen == ["Building engine"]
    # a second build in the same process (plugins already registered)
    build_engine.build_engine(trt_export / "model.onnx", trt_export / "model2.engine", max_seq=n // 2)
    assert trt.builds[-1][1].profiles[0].shapes["input_ids"][2] == (8, n // 2)


def test_build_engine_rejects_max_seq_above_n(monkeypatch, trt_export, capsys):
    trt_double.install(monkeypatch)
    n = json.loads((trt_export / "manifest.json").read_text())["config"]["max_seq_len"]
    code = build_engine.main([str(trt_export / "model.onnx"), "-o", str(trt_export / "x.engine"),
                              "--max-seq", str(n + 1)])
    err = capsys.readouterr().err
    assert code == 1 and f"exceeds the model's max_seq_len n={n}" in err and len(err.strip().splitlines()) == 1
    assert not (trt_export / "x.engine").exists()


def test_build_engine_tensorrt_api_error_is_one_line(monkeypatch, trt_export, capsys):
    """A TensorRT API the code does not match (e.g. a flag that moved) -> one line, exit 1, no file."""
    trt = trt_double.install(monkeypatch)
    monkeypatch.setattr(trt, "BuilderFlag", type("BuilderFlag", (), {}))  # a TensorRT without that flag
    code = build_engine.main([str(trt_export / "model.onnx"), "-o", str(trt_export / "y.engine"), "--fp16"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # progress lines ("[build] ...") may come first; one error line
    assert code == 1 and lines[-1].startswith("error: TensorRT ") and "FP16" in lines[-1]
    assert [ln for ln in lines if not ln.startswith("[build] ")] == lines[-1:]
    assert not (trt_export / "y.engine").exists()


EXPECTED_EXTRA = {  # int32 scalar args each kernel takes, from the node's input shapes (kernel signatures)
    "SMLPSpatialMoE": lambda s: (s[0][1], s[0][2], s[1][1]),  # T, c, n
    "SMLPSpatialMoEPartial": lambda s: (s[0][1], s[0][2], s[1][1]),  # T, c, n
    "SMLPGroupedExpertGemm": lambda s: (s[0][0],),  # M
}


def _observed(path, names: list[str], elem: dict) -> dict:
    """{name: (TensorRT dtype, concrete shape)} of intermediate tensors from an ONNX Runtime run."""
    import onnxruntime as ort

    model = onnx.load(path)
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: np.arange(14, dtype=np.int64).reshape(2, 7) % 50 for i in sess.get_inputs()}
    vals = sess.run(names, feed)
    to_onnx = {np.dtype(helper.tensor_dtype_to_np_dtype(t)): t for t in elem}
    return {n: (elem[to_onnx[v.dtype]], tuple(v.shape)) for n, v in zip(names, vals)}


@pytest.mark.triton
def test_exported_plugin_nodes_build_through_the_double(monkeypatch, trt_export):
    """Every plugin node of a real export, with the input dtypes / shapes the graph gives it, through
    the builder path down to the kernel: the exporter and the plugins agree on inputs and fields."""
    pytest.importorskip("triton", reason="triton extra not installed: pip install -e '.[triton]'")
    from onnx import shape_inference

    from smlp_export.kernels import aot

    trt = trt_double.install(monkeypatch)
    build_engine.register_plugins()
    monkeypatch.setattr(aot, "compile_ptx", _cached_compile(aot.compile_ptx))
    model = shape_inference.infer_shapes(onnx.load(trt_export / "model.onnx"))
    elem = {onnx.TensorProto.FLOAT: DT.FLOAT, onnx.TensorProto.FLOAT16: DT.HALF, onnx.TensorProto.BFLOAT16: DT.BF16,
            onnx.TensorProto.INT32: DT.INT32, onnx.TensorProto.INT64: DT.INT64}
    known = {t.name: (elem[t.data_type], tuple(t.dims)) for t in model.graph.initializer}
    inits = set(known)
    for v in list(model.graph.value_info) + list(model.graph.input):
        tt = v.type.tensor_type
        if tt.elem_type not in elem:  # e.g. the routing's BOOL masks: never a plugin input
            continue
        known[v.name] = (elem[tt.elem_type], tuple(d.dim_param or d.dim_value for d in tt.shape.dim))
    nodes = [n for n in model.graph.node if n.op_type in CONTRACTS]
    assert nodes
    # Tensors that shape inference leaves untyped (outputs of the standard-op routing, of plugin nodes:
    # it does not look through the fallback functions) get the dtype and shape a real run gives them.
    # All tensors of such a node are then taken from the run (concrete shapes, consistent with each other).
    partial = [n for n in nodes if any(x not in known for x in [*n.input, n.output[0]])]
    missing = sorted({x for n in partial for x in [*n.input, n.output[0]] if x not in inits})
    if missing:
        known.update(_observed(trt_export / "model.onnx", missing, elem))
    for node in nodes:
        ins = [known[i] for i in node.input]
        env = {s: 5 + i for i, s in enumerate(sorted({d for _, sh in ins for d in sh if isinstance(d, str)}))}
        res = build_plugin(trt, node, ins)
        out_type, out_shape = known[node.output[0]]
        assert res.output_types == [out_type], node.name
        got = tuple(bindings.evaluate(e, env) for e in res.output_shapes[0])
        assert got == tuple(env.get(d, d) for d in out_shape), node.name
        shapes = [tuple(env.get(d, d) for d in sh) for _, sh in ins]
        assert tuple(bindings.evaluate(e, env) for e in res.extra_args) == EXPECTED_EXTRA[node.op_type](shapes)
        assert res.kernel_name == aot.PLUGIN_KERNELS[COMPILED[-1][0]][0]
