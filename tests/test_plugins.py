"""TensorRT plugin glue, checked without TensorRT: node contract vs plugin functions, shape logic,
launch parameters, build_engine's profile / error paths, and the grouped-GEMM plugin kernel in the
interpreter. The plugins through TensorRT's plugin contract (registration, parser-encoded fields,
AOT PTX for sm_90 / sm_80, launch parameters): tests/test_trt_plugin_contract.py.
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
from pathlib import Path

import pytest

from smlp_export.export.contract import CONTRACTS

import smlp_plugins

PLUGINS = Path(smlp_plugins.__file__).resolve().parent


def _load(folder: str):
    return importlib.import_module(f"smlp_plugins.{folder}.plugin")


spa = _load("smlp_spatial_moe")
par = _load("smlp_spatial_moe_partial")
gg = _load("smlp_grouped_gemm")
FOLDERS = {"smlp_spatial_moe": spa, "smlp_spatial_moe_partial": par, "smlp_grouped_gemm": gg}
from smlp_plugins import _common, build_engine, export_info  # noqa: E402


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
                                 aot_impl=recorder("aot_impl"), autotune=recorder("autotune"),
                                 AutoTuneCombination=type("ATC", (), {}), op=types.SimpleNamespace())
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
            assert fn.__annotations__[attr] == _common.FIELD_ANNOTATIONS[typ]
    assert seen["register"][1].__annotations__["return"] is fake.TensorDesc
    assert list(inspect.signature(seen["aot_impl"][1]).parameters)[-2:] == ["outputs", "tactic"]


def test_build_engine_sequence_bound_comes_from_the_export(tmp_path):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"")
    with pytest.raises(ValueError, match="no manifest.json next to .*pass --max-seq"):
        export_info.resolve_max_seq(onnx_path, None)
    assert export_info.resolve_max_seq(onnx_path, 64) == 64  # no manifest: the user's bound
    (tmp_path / "manifest.json").write_text(json.dumps({"max_seq_len": 128, "config": {"max_seq_len": 128}}))
    assert export_info.resolve_max_seq(onnx_path, None) == 128
    assert export_info.resolve_max_seq(onnx_path, 100) == 100
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len n=128"):
        export_info.resolve_max_seq(onnx_path, 129)
