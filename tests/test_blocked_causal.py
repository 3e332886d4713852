"""Blocked-causal spatial products (export/blocked_causal.py): same numbers, fewer multiplies.

Oracle: the PyTorch model (exports vs eager on every T, including T below, at and between block
boundaries). The rule itself on hand-built graphs (NumPy oracle; non-causal MatMuls left alone):
tests/test_rewrite_rules.py.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

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
