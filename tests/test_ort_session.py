"""The one ONNX Runtime session factory (smlp_export/runners/ort_session.py): no silent provider
fallback, options that reach the session, and no other module creating a session."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from smlp_export.errors import SMLPError
from smlp_export.runners.base import RunnerUnavailable
from smlp_export.runners.ort_session import check_provider, create_session, session_options

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "smlp_export/runners/ort_session.py"
# Copied verbatim into Triton model repositories: they run inside tritonserver without smlp_export,
# so they make their own sessions (docs/architecture.md). deploy/triton.py's PYTHON_MODEL is such a
# file too, held as a string (not code this scan sees).
TRITON_REPO_FILES = ("smlp_export/deploy/full_model.py", "smlp_export/deploy/python_sequence_model.py",
                     "smlp_export/deploy/triton_generate.py")
SCANNED = ("smlp_export", "cli", "plugins", "benchmarks")


def session_sites(source: str) -> list[int]:
    """Lines that name ``InferenceSession`` / ``SessionOptions`` (attribute, name or import)."""
    names = {"InferenceSession", "SessionOptions"}
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in names:
            lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id in names:
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and any(a.name in names for a in node.names):
            lines.append(node.lineno)
    return sorted(lines)


def violations(root: Path) -> list[str]:
    out = []
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel == FACTORY or rel in TRITON_REPO_FILES:
                continue
            out += [f"{rel}:{n}" for n in session_sites(path.read_text())]
    return out


def test_only_the_factory_creates_onnxruntime_sessions():
    assert violations(ROOT) == [], "create sessions with smlp_export.runners.ort_session.create_session"


def test_the_scan_finds_a_planted_session(tmp_path):
    for top in SCANNED:
        (tmp_path / top).mkdir()
    (tmp_path / "benchmarks" / "b.py").write_text(
        "import onnxruntime as ort\n\ndef f(p):\n    return ort.InferenceSession(p)\n")
    (tmp_path / "smlp_export" / "c.py").write_text("from onnxruntime import SessionOptions as S\n")
    assert sorted(violations(tmp_path)) == ["benchmarks/b.py:4", "smlp_export/c.py:1"]


def test_the_triton_repository_files_are_self_contained():
    """The exception is only for files that cannot import the factory: they import no smlp_export."""
    for rel in TRITON_REPO_FILES:
        tree = ast.parse((ROOT / rel).read_text())
        mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert session_sites((ROOT / rel).read_text()), f"{rel} makes no session: drop it from the exception"
        assert not [m for m in mods if m.startswith("smlp_export") or m.startswith(".")], rel


def _matmul(path: Path | None = None) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096, "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    if path is not None:
        onnx.save(m, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return m


def test_unknown_provider_is_named():
    with pytest.raises(RunnerUnavailable, match="NoSuchExecutionProvider not in this onnxruntime build"):
        create_session(_matmul().SerializeToString(), providers=["NoSuchExecutionProvider"])
    with pytest.raises(RunnerUnavailable, match="NoSuchExecutionProvider is not in this onnxruntime build"):
        check_provider("NoSuchExecutionProvider")


def test_cuda_without_a_gpu_is_an_error_not_a_cpu_fallback():
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" not in ort.get_available_providers() or torch.cuda.is_available():
        pytest.skip("needs an onnxruntime build with CUDA on a machine without a usable GPU")
    with pytest.raises(RunnerUnavailable, match="fell back from CUDAExecutionProvider to CPUExecutionProvider"):
        create_session(_matmul().SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RunnerUnavailable, match="CUDAExecutionProvider needs a CUDA GPU"):
        check_provider("CUDAExecutionProvider")


def test_options_reach_the_session(tmp_path):
    so = session_options(intra_op_threads=2, inter_op_threads=1, prepacking=False, graph_optimization="basic",
                         config={"session.use_env_allocators": "1"})
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (2, 1)
    assert so.get_session_config_entry("session.disable_prepacking") == "1"
    assert so.get_session_config_entry("session.use_env_allocators") == "1"
    assert str(so.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
    with pytest.raises(ValueError, match="intra_op_threads must be an integer in 0..4096"):
        session_options(intra_op_threads=10**20)
    with pytest.raises(ValueError, match="graph_optimization must be one of"):
        session_options(graph_optimization="max")
    s = create_session(_matmul().SerializeToString(), profile_prefix=str(tmp_path / "prof"))
    s.run(None, {"x": np.ones((1, 64), np.float32)})
    assert Path(s.end_profiling()).is_file()


def test_external_data_from_a_path_and_from_bytes(tmp_path):
    path = tmp_path / "m.onnx"
    m = _matmul(path)
    x = np.ones((1, 64), np.float32)
    want = x @ numpy_helper.to_array(_matmul().graph.initializer[0])
    np.testing.assert_allclose(create_session(path).run(None, {"x": x})[0], want, rtol=1e-6)
    blob = path.read_bytes()
    assert len(blob) < 4096 and m.graph.initializer[0].data_location == TensorProto.EXTERNAL
    np.testing.assert_allclose(create_session(blob, external_data_dir=tmp_path).run(None, {"x": x})[0], want,
                               rtol=1e-6)


def test_a_model_onnxruntime_cannot_load_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(SMLPError, match=f"onnxruntime cannot load {bad}: ") as e:
        create_session(bad)
    assert "\n" not in str(e.value)


def _gather_model() -> onnx.ModelProto:
    """y = x + Gather(w, 1): ORT's ConstantFolding turns Gather(initializer, constant) into a new initializer."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    i = numpy_helper.from_array(np.array(1, dtype=np.int64), "i")
    g = helper.make_graph([helper.make_node("Gather", ["w", "i"], ["row"]), helper.make_node("Add", ["x", "row"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w, i])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("large", [False, True])
def test_large_model_options_keep_one_copy_of_the_weights(tmp_path, large):
    """LARGE_MODEL_OPTIONS: no constant folding (Gather stays a node), no arena, no prepacking; same result."""
    from smlp_export.runners.ort_session import LARGE_MODEL_OPTIONS

    opt = tmp_path / "optimized.onnx"
    kw = dict(LARGE_MODEL_OPTIONS) if large else {}
    s = create_session(_gather_model().SerializeToString(), optimized_model_path=opt,
                       **kw)
    np.testing.assert_array_equal(s.run(None, {"x": np.zeros(4, np.float32)})[0], [4, 5, 6, 7])
    ops = [n.op_type for n in onnx.load(str(opt)).graph.node]
    assert ("Gather" in ops) == large
    so = session_options(**{k: v for k, v in kw.items() if k != "constant_folding"})
    assert so.enable_cpu_mem_arena == (not large)
