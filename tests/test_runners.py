"""Runners: registry, ORT provider checks, the com.microsoft.MoE and Pad reference ops, and the
three runners agreeing on a real export (model-local functions included)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from smlp_export.errors import InputError
from smlp_export.runners import RunnerUnavailable, get_runner, register_runner, runner_names
from smlp_export.runners.ms_moe import MoE, moe_reference
from smlp_export.runners.ref_pad import Pad

from .conftest import micro_model

# Per-dtype tolerances for comparing two fp32 implementations of the same math (rtol, atol).
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _ref(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=[MoE, Pad]).run(None, feeds)


def test_registry_checks_names():
    assert {"torch", "ort", "reference"} <= set(runner_names())
    with pytest.raises(InputError, match="unknown backend 'tensorrtx'.*ort"):
        get_runner("tensorrtx", "x.onnx")
    with pytest.raises(ValueError, match="already registered"):
        register_runner("ort", "somewhere.else", "Runner")
    with pytest.raises(ValueError, match="must match"):
        register_runner("Bad Name", "m", "C")


def test_missing_onnx_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        get_runner("ort", tmp_path / "nope.onnx")
    with pytest.raises(InputError, match="model.onnx"):
        get_runner("reference", tmp_path)  # a folder without model.onnx


def _moe_model(E: int, H: int, f: int, k: int, activation: str, normalize: int) -> onnx.ModelProto:
    rng = np.random.default_rng(E * 100 + k)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n) for n, s in
             (("w1", (E, f, H)), ("b1", (E, f)), ("w2", (E, H, f)), ("b2", (E, H)))]
    node = helper.make_node("MoE", ["x", "r", "w1", "b1", "w2", "b2"], ["y"], domain="com.microsoft",
                            k=k, activation_type=activation, normalize_routing_weights=normalize)
    g = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", H]),
                                          helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", E])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", H])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


@pytest.mark.parametrize("k,activation,normalize", [(1, "gelu", 1), (2, "gelu", 1), (2, "relu", 0),
                                                    (1, "silu", 1), (2, "identity", 0)])
def test_msft_moe_reference_matches_onnxruntime(k, activation, normalize):
    """The NumPy com.microsoft.MoE agrees with ORT's kernel on an odd token count (33)."""
    E, H, f, N = 4, 8, 16, 33
    model = _moe_model(E, H, f, k, activation, normalize)
    rng = np.random.default_rng(7)
    feeds = {"x": rng.standard_normal((N, H)).astype(np.float32),
             "r": (rng.standard_normal((N, E)) * 2).astype(np.float32)}
    np.testing.assert_allclose(_ref(model, feeds)[0], _ort(model, feeds)[0], **FP32_TOL)


@pytest.mark.parametrize("k", [1, 2])
def test_msft_moe_reference_matches_model_op(k):
    """...and the model's own token-MoE reference ("topk" routing, gelu_tanh == ORT's gelu)."""
    from smlp_export.ops import token_moe_reference

    E, H, f, N = 4, 8, 16, 17
    torch.manual_seed(k)
    x, r = torch.randn(N, H), torch.randn(N, E) * 2
    w1, b1, w2, b2 = torch.randn(E, f, H), torch.randn(E, f), torch.randn(E, H, f), torch.randn(E, H)
    want = token_moe_reference(x, r, w1, b1, w2, b2, "topk", k, "gelu_tanh").numpy()
    got = moe_reference(x.numpy(), r.numpy(), w1.numpy(), b1.numpy(), w2.numpy(), b2.numpy(),
                        k=k, activation="gelu", normalize=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # torch computes in fp32, ours in fp64


@pytest.mark.parametrize("pads", [[0, 0, 0, 3], [0, 0, 0, -2], [0, -1, 0, 2], [1, 0, -1, 0]])
def test_pad_with_negative_pads_matches_onnxruntime(pads):
    """onnx 1.23's reference Pad rejects negative pads (allowed by the spec); ours crops like ORT."""
    node = helper.make_node("Pad", ["x", "pads", "v"], ["y"], mode="constant")
    g = helper.make_graph([node], "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array(pads, dtype=np.int64), "pads"),
                           numpy_helper.from_array(np.array(0.5, dtype=np.float32), "v")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    x = {"x": np.arange(10, dtype=np.float32).reshape(2, 5)}
    want = _ort(model, x)[0]
    got = _ref(model, x)[0]
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_ort_refuses_silent_provider_fallback(tmp_path):
    import onnxruntime as ort

    model = _moe_model(4, 8, 16, 1, "relu", 1)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(RunnerUnavailable, match="NoSuchExecutionProvider"):
        get_runner("ort", path, providers=["NoSuchExecutionProvider"]).load()
    if "CUDAExecutionProvider" not in ort.get_available_providers() or torch.cuda.is_available():
        pytest.skip("needs an onnxruntime build with CUDA on a machine without a usable GPU")
    with pytest.raises(RunnerUnavailable, match="fell back"):
        get_runner("ort", path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]).load()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A micro model (top-2 tMoE + partial sMoE) exported for the tensorrt target: smlp-domain nodes
    with model-local function bodies, which both ORT and the reference evaluator must inline."""
    from smlp_export.export.graph import build_onnx

    model = micro_model(token_routing="topk", top_k=2, spatial_routing="partial")
    path = tmp_path_factory.mktemp("runners") / "model.onnx"
    onnx.save(build_onnx(model, target="tensorrt", dtype="fp32", opset=18), str(path))
    return model, path


def test_runners_agree_on_an_export(exported):
    model, path = exported
    cfg = model.config
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, cfg.max_seq_len - 3))  # T > p: negative pad
    with get_runner("torch", model) as t, get_runner("ort", path, intra_op_threads=1) as o, \
            get_runner("reference", path) as r:
        want, got_o, got_r = t.run(ids), o.run(ids), r.run(ids)
        meta = o.metadata()
    assert set(want) == set(got_o) == set(got_r)
    assert {"logits", "router.blocks.1.tmoe", "router.blocks.1.smoe"} <= set(want)
    for name in want:
        assert got_o[name].dtype == got_r[name].dtype == np.float32
        np.testing.assert_allclose(got_o[name], want[name], **FP32_TOL, err_msg=f"ort {name}")
        np.testing.assert_allclose(got_r[name], want[name], **FP32_TOL, err_msg=f"reference {name}")
    assert meta["providers"] == ["CPUExecutionProvider"] and meta["intra_op_threads"] == 1
