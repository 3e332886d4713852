"""Weight-only quantized exports: operator layouts pinned against NumPy, the fake-quant twin,
end-to-end exactness + quality on a micro model, a corrupted scale failing validation, bad input."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from smlp_export.quantize.scheme import (QuantizeError, QuantScheme, dequantize, pack_signed_int4, pack_unsigned,
                                         quantize, quantized_parameters)

from .conftest import micro_model, rehash_manifest

RNG = np.random.default_rng(0)


def _run(nodes, inputs, outputs, inits, feeds, opset=18):
    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset), h.make_opsetid("com.microsoft", 1)], ir_version=10)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def _f(name, shape):
    return h.make_tensor_value_info(name, TP.FLOAT, shape)


def _swap_nibbles(b: np.ndarray) -> np.ndarray:
    return ((b >> 4) | (b << 4)).astype(np.uint8)


def test_quantize_formula_round_trips_within_half_a_step():
    w = RNG.standard_normal((6, 128)).astype(np.float32)
    for bits in (8, 4):
        for block in (32, 128, 0):
            q, s = quantize(w, bits, block)
            assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
            assert s.shape == (6, 128 // (block or 128))
            err = np.abs(dequantize(q, s) - w).reshape(6, s.shape[1], -1)
            assert (err <= s[..., None] / 2 + 1e-7).all()


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 64), (8, 32), (8, 128)])
def test_matmulnbits_layout_matches_numpy_dequantize(bits, block):
    """B [N, K/block, block*bits/8] packed along K (first value in the low nibble), scales [N, K/block]."""
    K, N = 128, 48
    w = RNG.standard_normal((N, K)).astype(np.float32)
    x = RNG.standard_normal((5, K)).astype(np.float32)
    q, s = quantize(w, bits, block)
    ref = x @ dequantize(q, s).T

    def run(b):
        node = h.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                           block_size=block, accuracy_level=0)
        return _run([node], [_f("x", [5, K])], [_f("y", [5, N])],
                    [nh.from_array(b.reshape(N, K // block, -1), "B"), nh.from_array(s, "S")], {"x": x})

    b = pack_unsigned(q, bits)
    np.testing.assert_allclose(run(b), ref, rtol=1e-5, atol=1e-5)
    if bits == 4:  # the nibble order matters: the other order is a different matrix
        assert np.abs(run(_swap_nibbles(b)) - ref).max() > 0.1


def _qmoe(x, logits, q1, s1, b1, q2, s2, b2, bits, block):
    attrs = dict(k=1, activation_type="gelu", normalize_routing_weights=1, expert_weight_bits=bits)
    if block:
        attrs["block_size"] = block
    n, d = x.shape
    node = h.make_node("QMoE", ["x", "r", "w1", "s1", "b1", "w2", "s2", "b2"], ["y"], domain="com.microsoft", **attrs)
    inits = [nh.from_array(a, nm) for a, nm in ((q1, "w1"), (s1, "s1"), (b1, "b1"), (q2, "w2"), (s2, "s2"), (b2, "b2"))]
    return _run([node], [_f("x", [n, d]), _f("r", list(logits.shape))], [_f("y", [n, d])], inits,
                {"x": x, "r": logits})


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 64), (8, 0)])
def test_qmoe_layout_matches_numpy_dequantize(bits, block):
    """fc1 [E, f, d*bits/8], fc2 [E, d, f*bits/8] (the model's w1 / w2 packed along the input
    features), scales [E, N, K/block] or [E, N] (per channel); every expert reached."""
    E, d, f, n = 4, 64, 128, 12
    x = RNG.standard_normal((n, d)).astype(np.float32)
    logits = RNG.standard_normal((n, E)).astype(np.float32)
    logits[np.arange(n), np.arange(n) % E] += 10  # every expert used
    w1, b1 = (RNG.standard_normal((E, f, d)) * 0.1).astype(np.float32), (RNG.standard_normal((E, f)) * 0.1).astype(np.float32)
    w2, b2 = (RNG.standard_normal((E, d, f)) * 0.1).astype(np.float32), (RNG.standard_normal((E, d)) * 0.1).astype(np.float32)
    (q1, s1), (q2, s2) = quantize(w1, bits, block), quantize(w2, bits, block)
    d1, d2 = dequantize(q1, s1), dequantize(q2, s2)
    gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))  # noqa: E731
    e = logits.argmax(-1)
    ref = np.stack([d2[e[i]] @ gelu(d1[e[i]] @ x[i] + b1[e[i]]) + b2[e[i]] for i in range(n)])
    if not block:
        s1, s2 = s1[..., 0], s2[..., 0]
    p1, p2 = pack_unsigned(q1, bits), pack_unsigned(q2, bits)
    np.testing.assert_allclose(_qmoe(x, logits, p1, s1, b1, p2, s2, b2, bits, block), ref, rtol=1e-5, atol=1e-5)
    bad = s1.copy()
    bad[2] *= 1.5  # one expert's scales wrong: its tokens, and only they, change
    got = _qmoe(x, logits, p1, bad, b1, p2, s2, b2, bits, block)
    assert np.abs(got - ref)[e == 2].max() > 1e-2 and np.abs(got - ref)[e != 2].max() < 1e-5
    if bits == 4:
        assert np.abs(_qmoe(x, logits, _swap_nibbles(p1), s1, b1, p2, s2, b2, bits, block) - ref).max() > 1e-2


def test_qmoe_blockwise_int8_is_not_weight_only():
    """Why int8 experts use per-channel scales: ORT's block-wise 8-bit QMoE quantizes activations."""
    E, d, f, n = 2, 64, 64, 6
    x = RNG.standard_normal((n, d)).astype(np.float32)
    logits = RNG.standard_normal((n, E)).astype(np.float32)
    w1, w2 = RNG.standard_normal((E, f, d)).astype(np.float32), RNG.standard_normal((E, d, f)).astype(np.float32)
    b1, b2 = np.zeros((E, f), np.float32), np.zeros((E, d), np.float32)
    (q1, s1), (q2, s2) = quantize(w1, 8, 32), quantize(w2, 8, 32)
    gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))  # noqa: E731
    e = logits.argmax(-1)
    d1, d2 = dequantize(q1, s1), dequantize(q2, s2)
    ref = np.stack([d2[e[i]] @ gelu(d1[e[i]] @ x[i]) for i in range(n)])
    got = _qmoe(x, logits, pack_unsigned(q1, 8), s1, b1, pack_unsigned(q2, 8), s2, b2, 8, 32)
    assert np.abs(got - ref).max() / np.abs(ref).max() > 1e-4  # if this starts failing, ORT gained a float kernel


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantizelinear_blockwise_layout(bits):
    """Signed int4 (element 2i in the low nibble) / int8, block_size along the input features, no zero point."""
    K, N = 64, 24
    w = RNG.standard_normal((K, N)).astype(np.float32)  # a MatMul operand: K on axis 0
    q, s = quantize(w.T, bits, 32)
    q, s = q.T, np.ascontiguousarray(s.T)  # [K, N], [K/32, N]
    if bits == 4:
        t = TP()
        t.name, t.data_type = "q", TP.INT4
        t.dims.extend(q.shape)
        t.raw_data = pack_signed_int4(q)
    else:
        t = nh.from_array(q, "q")
    node = h.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=0, block_size=32)
    g = h.make_graph([node], "g", [], [_f("y", [K, N])], [t, nh.from_array(s, "s")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    want = dequantize(q.T, s.T).T
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    np.testing.assert_array_equal(got, want)
    from onnx.reference import ReferenceEvaluator

    np.testing.assert_array_equal(ReferenceEvaluator(m).run(None, {})[0], want)


def test_scheme_selects_projections_experts_and_head_only():
    names = [n for n, _ in micro_model().named_parameters()]
    kinds = quantized_parameters(names)
    assert "lm_head.weight" in kinds and "embed.weight" not in kinds
    assert all(k == "expert" for n, k in kinds.items() if ".tmoe.w" in n)
    assert not any("centroids" in n or "norm" in n or "spatial" in n or n.endswith("smoe.weight") for n in kinds)


def test_fake_quant_twin_changes_exactly_the_quantized_weights():
    import torch

    from smlp_export.quantize.twin import fake_quant_twin

    m = micro_model()
    twin = fake_quant_twin(m, QuantScheme.make("int4", 32))
    kinds = quantized_parameters(dict(m.named_parameters()))
    for (n, a), (_, b) in zip(m.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b) != (n in kinds), n


# --------------------------------------------------------------------------------------------
# end to end on the micro model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    from smlp_export import save_checkpoint

    d = tmp_path_factory.mktemp("ckpt") / "micro"
    save_checkpoint(micro_model(), d)
    return d


@pytest.mark.parametrize("argv,needle", [
    (["--quantize", "int4", "--block-size", "64"], "does not divide the input width 32"),
    (["--quantize", "int4", "--target", "tensorrt"], "not available for --target tensorrt"),
    (["--quantize", "int8", "--target", "portable", "--opset", "18"], "needs --opset 21"),
    (["--quantize", "int8", "--dtype", "fp16"], "--dtype fp32"),
    (["--quantize", "int3"], "unknown --quantize"),
    (["--quantize", "int4", "--block-size", "48"], "--block-size 48 is not one of"),
    (["--block-size", "32"], "--block-size needs --quantize"),
])
def test_bad_quantize_requests_refused_before_tracing(micro_ckpt, tmp_path, capsys, monkeypatch, argv, needle):
    from smlp_export.export import graph

    from .test_bad_input import one_error_line, run_cli

    def no_trace(*a, **k):
        raise AssertionError("traced")

    monkeypatch.setattr(graph, "build_onnx", no_trace)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", micro_ckpt, "-o", out, *argv)
    assert code == 1 and needle in one_error_line(err)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.fixture(scope="module")
def micro_int4(micro_ckpt, tmp_path_factory):
    from smlp_export.export.pipeline import export_model

    out = tmp_path_factory.mktemp("q") / "int4"
    res = export_model(micro_ckpt, out, target="ort", quantize="int4", block_size=32, quick=True, decode=True)
    return out, res


def report_decode_passed(out) -> bool:
    return bool(json.loads((out / "parity.json").read_text())["decode"]["passed"])


@pytest.mark.slow
def test_int4_ort_export_passes_both_checks(micro_int4):
    out, res = micro_int4
    assert res.parity == "passed"
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    assert (q["method"], q["bits"], q["block_size"], q["expert_block"]) == ("int4", 4, 32, 32)
    assert q["bits_per_weight"] == pytest.approx(4 + 32 / 32)  # 4-bit values + one fp32 scale per 32
    for f in ("model.onnx", "decode.onnx", "decode_seq.onnx"):  # the decode graphs are quantized the same way
        ops = {n.op_type for n in onnx.load(out / f).graph.node}
        assert {"QMoE", "MatMulNBits"} <= ops and "MoE" not in ops, f
    assert report_decode_passed(out)
    report = json.loads((out / "parity.json").read_text())
    names = {c["name"]: c for c in report["checks"]}
    assert names["max_abs_err_rel"]["ok"] and names["quantized_ppl_delta_rel"]["ok"]
    assert names["expert_coverage"]["value"].split("/")[0] == names["expert_coverage"]["value"].split("/")[1]
    from smlp_export.inspect_export import describe_export, export_lines

    d = describe_export(out)
    qs = d["graphs"]["model.onnx"]["quantized"]  # read from the graph, must agree with the manifest
    assert (qs["weights"], qs["bytes"]) == (q["quantized_weights"], q["quantized_bytes"])
    assert any(ln.startswith("quant   int4") for ln in export_lines(d))
    qual = report["extra"]["quantization"]["metrics"]
    assert qual["ppl_quantized"] != qual["ppl_float"]  # measured against the float model, not the twin
    assert set(qual["routing_changed"]) == {"blocks.1.tmoe", "blocks.2.tmoe"} or qual["routing_changed"]


@pytest.mark.slow
def test_corrupted_scale_of_one_expert_fails_validation(micro_int4, micro_ckpt, tmp_path):
    """One expert's fc1 scales x 1.25 in one QMoE node: the export no longer equals the twin."""
    import shutil

    from smlp_export.validate import run_validation

    src, _ = micro_int4
    out = tmp_path / "bad"
    shutil.copytree(src, out)
    model = onnx.load(out / "model.onnx")
    qmoe = next(n for n in model.graph.node if n.op_type == "QMoE")
    t = next(t for t in model.graph.initializer if t.name == qmoe.input[3])
    s = nh.to_array(t).copy()
    s[1] *= 1.25
    t.CopyFrom(nh.from_array(s, t.name))
    onnx.save(model, out / "model.onnx")
    rehash_manifest(out)
    report = run_validation(out, "ort", checkpoint=str(micro_ckpt), quick=True)
    assert not report.passed
    assert any("max_abs_err" in f or "top1" in f for f in report.failures), report.failures


@pytest.mark.slow
def test_int4_portable_export_with_decode_passes(micro_ckpt, tmp_path):
    """DequantizeLinear (int4, block 32) feeding the same consumers, in model.onnx and the decode graphs."""
    from smlp_export.export.pipeline import export_model

    res = export_model(micro_ckpt, tmp_path / "p4", target="portable", opset=21, quantize="int4", quick=True,
                       decode=True)
    assert res.parity == "passed"
    for f in ("model.onnx", "decode.onnx", "decode_seq.onnx"):
        g = onnx.load(tmp_path / "p4" / f).graph
        dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
        assert dq and {t.data_type for t in g.initializer if t.name == dq[0].input[0]} == {TP.INT4}, f


@pytest.mark.slow
def test_bench_and_deploy_take_a_quantized_export_unchanged(micro_int4, tmp_path, capsys):
    from .test_bad_input import run_cli

    out, _ = micro_int4
    code, stdout, _ = run_cli(capsys, "bench", out, "--backends", "ort", "--batch", "1", "--seq", "8")
    assert code == 0 and "ort" in stdout
    repo = tmp_path / "repo"
    code, _, err = run_cli(capsys, "deploy", out, "-o", repo)
    assert code == 0, err
    served = next(repo.glob("*/1/model.onnx"))
    assert "QMoE" in {n.op_type for n in onnx.load(served).graph.node}
