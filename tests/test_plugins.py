"""TensorRT plugin glue, checked without TensorRT: node contract vs plugin functions, shape logic,
launch parameters, AOT PTX (sm_90 / sm_80) with the parameter layout TensorRT's AOT launch expects.

AOT compile tests carry the ``triton`` marker (they need the triton extra, not a GPU).
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import re
import sys
from pathlib import Path

import pytest

from smlp_export.export.contract import CONTRACTS

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def _load(folder: str):
    spec = importlib.util.spec_from_file_location(f"test_plugin_{folder}", PLUGINS / folder / "plugin.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


spa = _load("smlp_spatial_moe")
par = _load("smlp_spatial_moe_partial")
FOLDERS = {"smlp_spatial_moe": spa, "smlp_spatial_moe_partial": par}
sys.path.insert(0, str(PLUGINS))
import _common  # noqa: E402
import build_engine  # noqa: E402


def test_every_plugin_folder_names_a_contract_and_has_a_readme():
    assert {m.OP_TYPE for m in FOLDERS.values()} == set(CONTRACTS), "a contract without a plugin folder"
    assert {p.name for p in PLUGINS.iterdir() if (p / "plugin.py").exists()} == set(FOLDERS)
    for folder, mod in FOLDERS.items():
        c = CONTRACTS[mod.OP_TYPE]
        readme = (PLUGINS / folder / "README.md").read_text()
        assert c.op_type in readme and c.qualified_name in readme
        for name in c.inputs + c.outputs + tuple(c.attributes):
            assert f"`{name}`" in readme, f"{folder}/README.md does not document {name}"


def test_register_without_tensorrt_fails_with_one_clear_error():
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; the missing-TensorRT path cannot be exercised")
    except ImportError:
        pass
    for mod in FOLDERS.values():
        with pytest.raises(_common.TensorRTUnavailable, match="TensorRT not installed"):
            mod.register()
    assert build_engine.main(["missing.onnx", "-o", "x.engine"]) == 1


def test_check_signature_compares_names_and_order_with_the_contract():
    c = CONTRACTS["SMLPSpatialMoEPartial"]

    def good(z2, weight, bias, router_weight, num_experts, prefix):
        pass

    def swapped(z2, weight, bias, router_weight, prefix, num_experts):
        pass

    _common.check_signature(good, c)
    with pytest.raises(ValueError, match="contract needs"):
        _common.check_signature(swapped, c)
    # The plugin functions' parameters are written out in register(); check them against the contract
    # through the same source the registration uses.
    src = inspect.getsource(spa.register)
    assert "def desc(z2, weight, bias, num_experts)" in src
    src = inspect.getsource(par.register)
    assert "def desc(z2, weight, bias, router_weight, num_experts, prefix)" in src
    for mod in FOLDERS.values():  # the signatures written in register() must match the contract
        c = CONTRACTS[mod.OP_TYPE]
        assert f"def desc({', '.join(c.inputs + tuple(c.attributes))})" in inspect.getsource(mod.register)
    assert tuple(CONTRACTS["SMLPSpatialMoE"].inputs) == ("z2", "weight", "bias")
    assert tuple(CONTRACTS["SMLPSpatialMoE"].attributes) == ("num_experts",)


def test_spatial_output_shape_and_launch_cover_every_tile():
    assert spa.output_shape((2, 77, 12), (3, 96, 96), (3, 96), 3) == (2, 77, 12)
    with pytest.raises(ValueError, match="num_experts"):
        spa.output_shape((2, 77, 12), (3, 96, 96), (3, 96), 4)
    with pytest.raises(ValueError, match="exceeds"):
        spa.output_shape((2, 97, 12), (3, 96, 96), (3, 96), 3)
    with pytest.raises(ValueError, match="divisible"):
        spa.output_shape((2, 7, 10), (3, 96, 96), (3, 96), 3)
    for B, T, c, E in [(1, 1, 4, 4), (2, 77, 12, 3), (3, 1024, 1536, 4), (1, 65, 96, 2)]:
        gx, gy, gz, bx, _, _, _ = spa.launch(B, T, c, E, 4, 0)
        assert gx * spa.BLOCK_M >= T > (gx - 1) * spa.BLOCK_M
        assert gy == math.ceil((c // E) / spa.BLOCK_N) and gz == B * E and bx == 128


def test_spatial_partial_output_shape_and_launch():
    assert par.output_shape((2, 77, 12), (3, 96, 96), (3, 96), (20, 3), 3, 20) == (2, 77, 12)
    with pytest.raises(ValueError, match="router_weight"):
        par.output_shape((2, 77, 12), (3, 96, 96), (3, 96), (19, 3), 3, 20)
    with pytest.raises(ValueError, match="prefix"):
        par.kernel_constexprs(3, 0)
    gx, gy, gz, bx, _, _, _ = par.launch(2, 77, 12, 4, 0)
    assert (gx, gy, gz, bx) == (2, 1, 2, 128)


AOT_CASES = [  # (kernel, plugin module, constexprs, user params)
    ("spatial_moe", spa, lambda: spa.kernel_constexprs(4), 3 + 3 + 1),
    ("spatial_moe_partial", par, lambda: par.kernel_constexprs(4, 205), 4 + 3 + 1),
]


@pytest.mark.triton
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("kernel,mod,constexprs,user_params", AOT_CASES, ids=[c[0] for c in AOT_CASES])
def test_aot_ptx_has_named_entry_and_trt_param_layout(kernel, mod, constexprs, user_params, arch):
    pytest.importorskip("triton", reason="triton extra not installed: pip install -e '.[triton]'")
    from smlp_export.kernels.aot import PLUGIN_KERNELS, SCRATCH_PARAMS, compile_ptx

    dtype = "float16" if arch == 80 else "bfloat16"
    ck = compile_ptx(kernel, dtype, arch, constexprs(), num_warps=mod.NUM_WARPS)
    assert ck.name == PLUGIN_KERNELS[kernel][0]
    assert f".entry {ck.name}(" in ck.ptx
    assert f".target sm_{arch}" in ck.ptx
    assert ".version 8.0" in ck.ptx  # loadable by CUDA 12.0+ drivers
    # TensorRT passes inputs, the int32 extra args, then outputs; Triton appends 2 scratch pointers.
    assert ck.num_params == user_params + SCRATCH_PARAMS
    entry = ck.ptx[ck.ptx.index(f".entry {ck.name}(") + len(f".entry {ck.name}("):]
    kinds = re.findall(r"\.param\s+(\.\w+)", entry[:entry.index(")")])
    _, ptrs, scalars, outs = PLUGIN_KERNELS[kernel]
    assert kinds == [".u64"] * len(ptrs) + [".u32"] * len(scalars) + [".u64"] * len(outs) + [".u64"] * SCRATCH_PARAMS
    assert ck.num_warps == mod.NUM_WARPS and ck.block_x == 32 * mod.NUM_WARPS


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_register_declares_contract_signature_to_tensorrt(folder, monkeypatch):
    """register() against a recording stand-in for tensorrt.plugin: the descriptor and the AOT impl
    are registered under the contract's qualified name, with annotations TensorRT reads."""
    import types

    mod = FOLDERS[folder]
    c = CONTRACTS[mod.OP_TYPE]
    seen: dict[str, object] = {}

    def recorder(kind):
        def deco_factory(name):
            def deco(fn):
                seen[kind] = (name, fn)
                return fn
            return deco
        return deco_factory

    fake = types.SimpleNamespace(TensorDesc=type("TensorDesc", (), {}), KernelLaunchParams=type("KLP", (), {}),
                                 SymIntExprs=type("SIE", (), {}), register=recorder("register"),
                                 aot_impl=recorder("aot_impl"))
    monkeypatch.setattr(mod, "import_trtp", lambda: fake)
    mod.register()
    for kind in ("register", "aot_impl"):
        name, fn = seen[kind]
        assert name == c.qualified_name
        params = list(inspect.signature(fn).parameters)
        assert params[: len(c.inputs) + len(c.attributes)] == list(c.inputs) + list(c.attributes)
        for inp in c.inputs:
            assert fn.__annotations__[inp] is fake.TensorDesc
        for attr, typ in c.attributes.items():
            assert fn.__annotations__[attr] is typ
    assert seen["register"][1].__annotations__["return"] is fake.TensorDesc
    assert list(inspect.signature(seen["aot_impl"][1]).parameters)[-2:] == ["outputs", "tactic"]
