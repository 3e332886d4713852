"""The one MoE permutation (``smlp_export.permutation``) and its ONNX mirror
(``export.moe_graph.permute_by_expert``): the torch counting sort against a stable argsort oracle,
the graph against the torch twin in ONNX Runtime and the reference evaluator, over odd shapes,
empty experts and skewed routings."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from smlp_export.export.moe_graph import GraphBuilder, expert_loop, permute_by_expert
from smlp_export.permutation import permute_by_expert as permute_torch

OPSET = 18


def _oracle(ids: torch.Tensor, E: int) -> tuple[list[int], list[int], list[int]]:
    """order, position, offsets from torch's stable argsort + bincount (not a counting sort)."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(flat.numel())
    offsets = [0, *torch.bincount(flat, minlength=E).cumsum(0).tolist()]
    return order.tolist(), position.tolist(), offsets


def _ids(M: int, E: int, seed: int, skew: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (M,), generator=g)
    if skew and M:  # long runs of expert 0, most other experts empty
        ids[torch.rand(M, generator=g) < 0.8] = 0
    return ids


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(0, 600), st.integers(1, 9), st.integers(0, 2**31 - 1), st.booleans())
def test_counting_sort_is_the_stable_argsort(M, E, seed, skew) -> None:
    ids = _ids(M, E, seed, skew)
    order, position, offsets = permute_torch(ids, E)
    assert (order.tolist(), position.tolist(), offsets.tolist()) == _oracle(ids, E)
    assert order.dtype == position.dtype == offsets.dtype == torch.int64


def test_counting_sort_keeps_the_input_shape_meaning() -> None:
    """expert_ids [N, k] is read row-major: row r = token r // k, slot r % k."""
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    order, position, offsets = permute_torch(ids, 4)
    assert order.tolist() == [1, 2, 3, 5, 0, 4] and offsets.tolist() == [0, 2, 4, 6, 6]
    assert position[order].tolist() == list(range(6))


def _graph_model() -> onnx.ModelProto:
    b = GraphBuilder(prefix="p_")
    perm = permute_by_expert(b, "ids", b.dim("w", 0))
    for value, name in zip(perm, ("order", "position", "offsets")):
        b.nodes.append(helper.make_node("Identity", [value], [name]))
    graph = helper.make_graph(
        b.nodes, "perm",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["M"]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, ["E"])],
        [helper.make_tensor_value_info("order", TensorProto.INT64, ["M"]),
         helper.make_tensor_value_info("position", TensorProto.INT64, ["M"]),
         helper.make_tensor_value_info("offsets", TensorProto.INT32, ["E1"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def graph_runners():
    model = _graph_model()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return {"ort": lambda feeds: sess.run(None, feeds), "reference": lambda feeds: ReferenceEvaluator(model).run(None, feeds)}


@pytest.mark.parametrize("runner", ["ort", "reference"])
@pytest.mark.parametrize("M, E, skew", [(1, 1, False), (33, 4, False), (511, 7, True), (64, 5, True), (2, 9, False)])
def test_graph_mirrors_the_torch_counting_sort(graph_runners, runner, M, E, skew) -> None:
    ids = _ids(M, E, seed=M * 13 + E, skew=skew)
    got = graph_runners[runner]({"ids": ids.numpy(), "w": np.zeros(E, np.float32)})
    want = permute_torch(ids, E)
    for g, w, name in zip(got, want, ("order", "position", "offsets")):
        np.testing.assert_array_equal(g, w.numpy(), err_msg=name)
    assert got[2].dtype == np.int32  # what the grouped-GEMM plugin reads


def test_graph_counts_in_float32_with_integer_results() -> None:
    """TensorRT's parser lists CumSum for float types only: every CumSum of the permutation reads
    a float32 tensor (exact up to moe_graph.MAX_GRAPH_ROWS rows)."""
    model = onnx.shape_inference.infer_shapes(_graph_model())
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    cumsums = [n for n in model.graph.node if n.op_type == "CumSum"]
    assert len(cumsums) == 2 and all(types[n.input[0]] == TensorProto.FLOAT for n in cumsums)


@pytest.mark.parametrize("unroll", [None, 4], ids=["loop", "unrolled"])
def test_expert_loop_writes_each_experts_rows_in_place(unroll) -> None:
    """expert_loop: rows offsets[e]:offsets[e+1] through the body with expert e (here: x * (e + 1)
    + e), empty experts included; the Loop's carried result keeps its [M, width] shape."""
    b = GraphBuilder(prefix="l_")

    def body(sub: GraphBuilder, rows: str, e: str) -> str:
        ef = sub.op("CastLike", e, rows)
        return sub.op("Add", sub.op("Mul", rows, sub.op("Add", ef, sub.fconst(1.0, rows))), ef)

    y = expert_loop(b, "x", "offsets", b.ints(4), elem=TensorProto.FLOAT,
                    width=b.dim("x", 1), body=body, unroll=unroll)
    b.output(y, "y")
    graph = helper.make_graph(
        b.nodes, "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 3]),
         helper.make_tensor_value_info("offsets", TensorProto.INT32, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    x = np.arange(27, dtype=np.float32).reshape(9, 3)
    offsets = np.array([0, 3, 3, 8, 9], np.int32)
    want = x.copy()
    for e in range(4):
        want[offsets[e]:offsets[e + 1]] = x[offsets[e]:offsets[e + 1]] * (e + 1) + e
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x, "offsets": offsets})[0], want)
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {"x": x, "offsets": offsets})[0], want)
