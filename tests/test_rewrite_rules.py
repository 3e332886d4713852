"""The export's graph rewrite rules (export/optimize.py, blocked_causal.py, rewrites.py), one at a
time on tiny hand-built graphs: each must fire where its pattern holds (same numbers, checked with
ONNX Runtime against NumPy) and leave the graph alone where it does not."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxscript.rewriter import pattern

from smlp_export.export import weights
from smlp_export.export.blocked_causal import causal_rules
from smlp_export.export.optimize import GELU_RULES, PREMASK_RULES, SPLIT_RULES
from smlp_export.export.rewrites import AutoTokenMoE, apply_rules

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits, domains=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    ops = [helper.make_opsetid("", 18)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=ops, ir_version=10)


def _ops(proto: onnx.ModelProto) -> Counter:
    return Counter((n.domain + "::" if n.domain else "") + n.op_type for n in proto.graph.node)


def _run(proto: onnx.ModelProto, **feeds) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _i64(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


# --- PremaskedWeight: Trilu(Slice*(W)) -> Slice*(tril(W)) -------------------------------------
def _masked_weight(w: np.ndarray, *, starts=(0, 0), k: int | None = 0, two_slices: bool = True) -> onnx.ModelProto:
    """Y = Trilu(W[:T, :T], upper=0) @ Z, the corner sliced the way the exporter does it."""
    nodes = [helper.make_node("Shape", ["Z"], ["t"], start=0, end=1)]
    if two_slices:
        nodes += [helper.make_node("Slice", ["W", "s0", "t", "ax0", "one"], ["c0"]),
                  helper.make_node("Slice", ["c0", "s1", "t", "ax1", "one"], ["c1"])]
    else:
        nodes += [helper.make_node("Concat", ["t", "t"], ["tt"], axis=0),
                  helper.make_node("Slice", ["W", "s01", "tt", "ax01"], ["c1"])]
    nodes += [helper.make_node("Trilu", ["c1"] + (["k"] if k is not None else []), ["A"], upper=0),
              helper.make_node("MatMul", ["A", "Z"], ["Y"])]
    inits = [numpy_helper.from_array(w, "W"), _i64("s0", [starts[0]]), _i64("s1", [starts[1]]),
             _i64("s01", list(starts)), _i64("ax0", [0]), _i64("ax1", [1]), _i64("ax01", [0, 1]),
             _i64("one", [1]), _i64("k", k or 0)]
    return _model(nodes, [helper.make_tensor_value_info("Z", F, ["T", 3])],
                  [helper.make_tensor_value_info("Y", F, ["T", 3])], inits)


@pytest.mark.parametrize("two_slices", [True, False])
def test_premask_fires_on_zero_start_slices(two_slices: bool) -> None:
    w = np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32)
    out = apply_rules(_masked_weight(w, two_slices=two_slices), [PREMASK_RULES])
    assert _ops(out)["Trilu"] == 0 and _ops(out)["Slice"] == (2 if two_slices else 1)
    tril = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert "W" not in tril and np.array_equal(tril["W.tril"], np.tril(w))
    z = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_allclose(_run(out, Z=z), np.tril(w)[:4, :4] @ z, rtol=1e-6)


@pytest.mark.parametrize("case", ["offset_start", "k_nonzero"])
def test_premask_leaves_other_masks_alone(case: str) -> None:
    """A corner not at the origin is not the lower triangle of tril(W); Trilu with k != 0 neither."""
    w = np.ones((6, 6), np.float32)
    proto = _masked_weight(w, starts=(1, 0)) if case == "offset_start" else _masked_weight(w, k=1)
    assert _ops(apply_rules(proto, [PREMASK_RULES]))["Trilu"] == 1


def test_premask_of_a_placeholder_extends_its_recipe() -> None:
    """A low-memory export's weight has no data: the rule derives a placeholder (recipe + tril)."""
    proto = _masked_weight(np.ones((6, 6), np.float32))
    inits = [t for t in proto.graph.initializer if t.name != "W"]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend([weights.placeholder("W", [6, 6], weights.Recipe("spatial.weight", F)), *inits])
    out = apply_rules(proto, [PREMASK_RULES])
    r = {t.name: weights.recipe_of(t) for t in out.graph.initializer}
    assert r["W.tril"] == weights.Recipe("spatial.weight", F, (("tril",),)) and "W" not in r


# --- erf GELU -> com.microsoft.Gelu (onnxscript's shipped rules) ------------------------------
def _erf_gelu(sqrt2: float, dtype=np.float32) -> onnx.ModelProto:
    """x * ((erf(x / sqrt2) + 1) * 0.5): the operand order the dynamo exporter writes."""
    nodes = [helper.make_node("Div", ["x", "r2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["a", "half"], ["h"]),
             helper.make_node("Mul", ["x", "h"], ["y"])]
    inits = [numpy_helper.from_array(np.array(v, dtype), n) for n, v in (("r2", sqrt2), ("one", 1.0), ("half", 0.5))]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return _model(nodes, [helper.make_tensor_value_info("x", elem, [5])], [helper.make_tensor_value_info("y", elem, [5])],
                  inits)


def test_gelu_fuses_the_exporters_erf_gelu() -> None:
    out = apply_rules(_erf_gelu(math.sqrt(2)), [GELU_RULES])
    assert _ops(out) == Counter({"com.microsoft::Gelu": 1})
    x = np.linspace(-3, 3, 5).astype(np.float32)
    want = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    np.testing.assert_allclose(_run(out, x=x), want, rtol=1e-6, atol=1e-7)


def test_gelu_fuses_half_precision_erf_gelu() -> None:
    """fp16 sqrt(2) is 1.414 (half an ulp off): onnxscript's rules miss it, HalfPrecisionErfGelu not."""
    out = apply_rules(_erf_gelu(math.sqrt(2), np.float16), [GELU_RULES])
    assert _ops(out) == Counter({"com.microsoft::Gelu": 1})


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gelu_leaves_another_function_alone(dtype) -> None:
    assert _ops(apply_rules(_erf_gelu(1.5, dtype), [GELU_RULES]))["Erf"] == 1


# --- SplitGeluWeights: Split(Gelu(x W + b)) -> two half-width chains ----------------------------
def _split_gelu(out: int, axis: int = -1) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["b", "m"], ["p"]),
             helper.make_node("Gelu", ["p"], ["g"], domain="com.microsoft"),
             helper.make_node("Split", ["g"], ["u", "v"], axis=axis, num_outputs=2),
             helper.make_node("Mul", ["u", "v"], ["y"])]
    inits = [numpy_helper.from_array(rng.standard_normal((4, out)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(out).astype(np.float32), "b")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [1, 3, 4])],
                  [helper.make_tensor_value_info("y", F, None)], inits, domains=["com.microsoft"])


def test_split_weights_fires_and_keeps_the_numbers() -> None:
    proto = _split_gelu(6)
    x = np.random.default_rng(3).standard_normal((1, 3, 4)).astype(np.float32)
    want = _run(proto, x=x)
    out = apply_rules(proto, [SPLIT_RULES])  # Add(b, MatMul): the commuted operand order
    assert _ops(out) == Counter({"MatMul": 2, "Add": 2, "com.microsoft::Gelu": 2, "Mul": 1})
    assert {t.name for t in out.graph.initializer} == {"W.part0", "W.part1", "b.part0", "b.part1"}
    np.testing.assert_allclose(_run(out, x=x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out, axis", [(5, -1), (6, 1)])
def test_split_weights_needs_even_width_on_the_last_axis(out: int, axis: int) -> None:
    proto = _split_gelu(out, axis)
    assert _ops(apply_rules(proto, [SPLIT_RULES]))["Split"] == 1


# --- BlockCausalMatMul ---------------------------------------------------------------------------
def _causal_matmul(w: np.ndarray, trilu: bool) -> onnx.ModelProto:
    """Y = MatMul(A, Z) with A = W[:T, :T] (or Trilu of it), T from Z's rows (dynamic)."""
    nodes = [helper.make_node("Shape", ["Z"], ["t"], start=0, end=1),
             helper.make_node("Concat", ["t", "t"], ["tt"], axis=0),
             helper.make_node("Slice", ["W", "zeros", "tt", "axes"], ["A0" if trilu else "A"])]
    if trilu:
        nodes.append(helper.make_node("Trilu", ["A0"], ["A"], upper=0))
    nodes.append(helper.make_node("MatMul", ["A", "Z"], ["Y"]))
    inits = [numpy_helper.from_array(w, "W"), _i64("zeros", [0, 0]), _i64("axes", [0, 1])]
    return _model(nodes, [helper.make_tensor_value_info("Z", F, ["T", 3])],
                  [helper.make_tensor_value_info("Y", F, ["T", 3])], inits)


def test_block_causal_fires_on_causal_operands_only() -> None:
    rng = np.random.default_rng(0)
    full = rng.standard_normal((20, 20)).astype(np.float32)
    # a Slice of a non-triangular weight is not causal: left alone (skipping blocks would be wrong)
    assert _ops(apply_rules(_causal_matmul(full, trilu=False), [causal_rules(20, 6)]))["MatMul"] == 1
    # the same weight masked by Trilu, and a pre-masked (lower-triangular) initializer: rewritten
    for w, trilu in ((full, True), (np.tril(full), False)):
        out = apply_rules(_causal_matmul(w, trilu), [causal_rules(20, 6)])
        assert _ops(out)["MatMul"] == 4 and _ops(out)["Concat"] == 2  # ceil(20 / 6) row blocks
        for T in (1, 5, 6, 7, 13, 20):
            z = rng.standard_normal((T, 3)).astype(np.float32)
            np.testing.assert_allclose(_run(out, Z=z), np.tril(full)[:T, :T] @ z, rtol=1e-5, atol=1e-5)


def test_block_at_least_n_is_no_rule() -> None:
    assert causal_rules(8, 8) is None and causal_rules(8, 0) is None


# --- AutoTokenMoE (ort --ort-moe auto) -----------------------------------------------------------
def _token_moe(activation: str) -> onnx.ModelProto:
    node = helper.make_node("SMLPTokenMoE", ["h", "r", "w1", "b1", "w2", "b2"], ["y"], domain="smlp",
                            routing="topk", k=2, activation=activation)
    ins = [helper.make_tensor_value_info(n, F, None) for n in ("h", "r", "w1", "b1", "w2", "b2")]
    return _model([node], ins, [helper.make_tensor_value_info("y", F, None)], [], domains=["smlp"])


def test_auto_token_moe_wraps_mappable_layers_in_an_if() -> None:
    out = apply_rules(_token_moe("relu"), [pattern.RewriteRuleSet([AutoTokenMoE.rule(F)])])
    assert _ops(out) == Counter({"Shape": 1, "Constant": 1, "LessOrEqual": 1, "Squeeze": 1, "If": 1})
    branches = {a.name: a.g for a in out.graph.node[-1].attribute}
    fused = branches["then_branch"].node
    assert [(n.domain, n.op_type) for n in fused] == [("com.microsoft", "MoE")]
    assert {a.name: helper.get_attribute_value(a) for a in fused[0].attribute} == {
        "k": 2, "activation_type": b"relu", "normalize_routing_weights": 1}
    assert [(n.domain, n.op_type, list(n.input)) for n in branches["else_branch"].node] == [
        ("smlp", "SMLPTokenMoE", ["h", "r", "w1", "b1", "w2", "b2"])]
    assert "com.microsoft" in {o.domain for o in out.opset_import}


def test_auto_token_moe_leaves_unmappable_activations_alone() -> None:
    out = apply_rules(_token_moe("gelu"), [pattern.RewriteRuleSet([AutoTokenMoE.rule(F)])])
    assert _ops(out) == Counter({"smlp::SMLPTokenMoE": 1})
