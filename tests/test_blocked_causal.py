"""Blocked-causal spatial products (export/blocked_causal.py): same numbers, fewer multiplies.

Oracles: the PyTorch model (exports vs eager on every T, including T below, at and between block
boundaries) and NumPy products on hand-built graphs; the rewrite must leave non-causal MatMuls alone.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from smlp_export.export.blocked_causal import block_causal_matmuls
from smlp_export.export.graph import build_onnx

from .conftest import micro_model


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("target", ["ort", "portable"])
def test_blocked_export_matches_torch_at_every_boundary(target: str) -> None:
    model = micro_model(seed=2)  # n = 32: blocks of 8 -> 4 row blocks
    proto = build_onnx(model, target=target, dtype="fp32", opset=18, causal_block=8)
    dense = build_onnx(model, target=target, dtype="fp32", opset=18, causal_block=0)
    onnx.checker.check_model(proto, full_check=True)
    mm = lambda p: sum(n.op_type == "MatMul" for n in p.graph.node)  # noqa: E731
    # 1 dense block + 2 deterministic sMoEs = 3 spatial products, each now 4 MatMuls instead of 1
    assert mm(proto) - mm(dense) == 3 * 3
    sess = _session(proto)
    for T in (1, 7, 8, 9, 16, 25, 32):
        ids = torch.randint(0, 257, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            want = model(ids).numpy()
        got = sess.run(None, {"input_ids": ids.numpy()})[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), f"T={T}"


def _matmul_graph(w: np.ndarray, trilu: bool) -> onnx.ModelProto:
    """Y = MatMul(A, Z) with A = W[:T, :T] (or Trilu of it), T from Z's rows (dynamic)."""
    nodes = [helper.make_node("Shape", ["Z"], ["t"], start=0, end=1),
             helper.make_node("Concat", ["t", "t"], ["tt"], axis=0),
             helper.make_node("Slice", ["W", "zeros", "tt", "axes"], ["A0" if trilu else "A"])]
    if trilu:
        nodes.append(helper.make_node("Trilu", ["A0"], ["A"], upper=0))
    nodes.append(helper.make_node("MatMul", ["A", "Z"], ["Y"]))
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(2, np.int64), "zeros"),
             numpy_helper.from_array(np.array([0, 1], np.int64), "axes")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["T", 3])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_only_causal_operands_are_rewritten() -> None:
    rng = np.random.default_rng(0)
    full = rng.standard_normal((20, 20)).astype(np.float32)
    # a Slice of a non-triangular weight is not causal: left alone (skipping blocks would be wrong)
    assert block_causal_matmuls(_matmul_graph(full, trilu=False), 20, 6) == 0
    # the same weight masked by Trilu, and a pre-masked (lower-triangular) initializer: rewritten
    for w, trilu in ((full, True), (np.tril(full), False)):
        proto = _matmul_graph(w, trilu)
        assert block_causal_matmuls(proto, 20, 6) == 1
        sess = _session(proto)
        for T in (1, 5, 6, 7, 13, 20):
            z = rng.standard_normal((T, 3)).astype(np.float32)
            np.testing.assert_allclose(sess.run(None, {"Z": z})[0], np.tril(full)[:T, :T] @ z, rtol=1e-5, atol=1e-5)


def test_block_at_least_n_changes_nothing() -> None:
    proto = _matmul_graph(np.tril(np.ones((8, 8), np.float32)), trilu=False)
    assert block_causal_matmuls(proto, 8, 8) == 0 and block_causal_matmuls(proto, 8, 0) == 0


def test_default_blocks_long_models_only() -> None:
    """n >= 1024 exports blocked by default (measured faster there, docs/export.md); parity at long T."""
    model = micro_model(seed=4, max_seq_len=1024)
    proto = build_onnx(model, target="ort", dtype="fp32", opset=18)
    blocks = [n for n in proto.graph.node if n.op_type == "MatMul" and ".blk" in n.output[0]]
    assert len(blocks) == 3 * 4  # 3 spatial products, 1024 / 256 row blocks each
    sess = _session(proto)
    for T in (3, 700):
        ids = torch.randint(0, 257, (1, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            want = model(ids).numpy()
        got = sess.run(None, {"input_ids": ids.numpy()})[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), f"T={T}"
    short = build_onnx(micro_model(seed=4), target="ort", dtype="fp32", opset=18)  # n = 32
    assert not any(".blk" in n.output[0] for n in short.graph.node)
