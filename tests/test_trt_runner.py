"""The TensorRT runner (``smlp_plugins.trt_runner``) behind ``smlp validate --backend tensorrt`` and
``smlp bench --backends tensorrt``.

TensorRT cannot be installed here, so everything below TensorRT's Python API and the CUDA runtime
is a double (tests/trt_double: ``bindings`` / ``builder`` / ``engine`` for ``tensorrt``, ``cudart``
for the C API Polygraphy's CUDA wrapper calls). The code under test -- our runner, Polygraphy's
real ``EngineFromBytes`` and ``TrtRunner``, the validator and the benchmark -- is the real code.
The double computes engine outputs with ONNX Runtime on the parsed graph: these tests check the
path around the engine, not TensorRT's numerics.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("polygraphy", reason="polygraphy (dev extra) not installed: pip install -e '.[dev]'")

from smlp_cli.main import main  # noqa: E402
from smlp_export.errors import InputError, SMLPError  # noqa: E402
from smlp_export.runners import get_runner  # noqa: E402
from smlp_export.validate import run_validation  # noqa: E402

from . import trt_double  # noqa: E402
from .trt_double import cudart  # noqa: E402
from .trt_double.engine import ICudaEngine  # noqa: E402


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    """A micro top-2 model exported with --target tensorrt (plugin nodes + fallback functions)."""
    from smlp_export import save_checkpoint
    from smlp_export.export.pipeline import export_model

    from .conftest import micro_model

    tmp = tmp_path_factory.mktemp("trt_runner")
    ck = save_checkpoint(micro_model(token_routing="topk", top_k=2), tmp / "ck")
    export_model(str(ck), tmp / "out", target="tensorrt", validate=False)
    return tmp / "out"


@pytest.fixture
def trt(monkeypatch):
    """The TensorRT double and the CUDA runtime double, installed for one test."""
    mod = trt_double.install(monkeypatch)
    mod.cuda_runtime = cudart.install(monkeypatch)
    return mod


def _run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# ---- without TensorRT -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["validate", "{out}", "--backend", "tensorrt"],
                                  ["bench", "{out}", "--backends", "tensorrt", "--quick"]])
def test_without_tensorrt_one_line_and_nonzero_exit(monkeypatch, capsys, trt_export, argv):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # import tensorrt -> ImportError
    before = sorted(p.name for p in trt_export.iterdir())
    code, out, err = _run_cli(capsys, *[a.format(out=trt_export) for a in argv])
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "TensorRT not installed" in lines[0] and "pip install 'smlp-export[tensorrt]'" in lines[0]
    assert sorted(p.name for p in trt_export.iterdir()) == before  # nothing written


# ---- through the double -----------------------------------------------------------------------------
def test_runner_builds_runs_and_matches_onnxruntime(trt, trt_export):
    """No engine in OUT: one is built (prefill profile, batch 1..32, seq 1..n) outside OUT, loaded by
    Polygraphy, and its outputs come back through device buffers equal to ONNX Runtime's."""
    from smlp_export.runners.ort_runner import OrtRunner

    ids = np.random.default_rng(0).integers(0, 257, (3, 9), dtype=np.int64)
    with get_runner("tensorrt", trt_export) as r:
        got = r.run(ids)
        meta = r.metadata()
        again = r.run(ids[:1, :4])  # another shape on the same context
    with OrtRunner(trt_export) as o:
        want = o.run(ids)
    assert set(got) == set(want) and got["logits"].shape == (3, 9, 257)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6)
    assert again["logits"].shape == (1, 4, 257)
    assert not (trt_export / "model.engine").exists()
    (network, config), = trt.builds
    n = json.loads((trt_export / "manifest.json").read_text())["max_seq_len"]
    assert [p.shapes["input_ids"] for p in config.profiles] == [((1, 1), (16, n // 2), (32, n))]
    assert meta["engine_built_here"] and meta["backend"] == "tensorrt" and meta["tensorrt"] == trt.__version__
    assert trt.cuda_runtime.copies >= 2 * (1 + len(got))  # inputs in, every output out, twice
    assert not trt.cuda_runtime.streams  # close() freed the stream


def test_validate_passes_through_the_double(trt, trt_export):
    report = run_validation(trt_export, "tensorrt", quick=True, write=False)
    assert report.passed, report.failures
    assert report.backend == "tensorrt" and report.backend_metadata["engine_built_here"]
    assert report.metrics["max_abs_err"] < 1e-4
    assert report.decode is None or report.decode.get("passed") is None  # decode.onnx: ORT only


def test_validate_fails_on_a_wrong_engine_output(trt, trt_export, monkeypatch, capsys):
    """A planted engine fault (logits off by 1 % of their scale at one vocabulary entry) must fail."""
    def fault(logits):
        bad = logits.copy()
        bad[..., 7] += 0.01 * np.abs(logits).max()
        return bad

    monkeypatch.setattr(ICudaEngine, "faults", {"logits": fault})
    code, out, err = _run_cli(capsys, "validate", str(trt_export), "--backend", "tensorrt", "--quick")
    assert code == 1 and "FAILED" in out and "max_abs_err" in err + out
    report = json.loads((trt_export / "parity.json").read_text())
    assert report["backend"] == "tensorrt" and not report["passed"]
    (trt_export / "parity.json").unlink()


def test_existing_engine_is_loaded_and_a_stale_one_refused(trt, trt_export, tmp_path):
    from smlp_plugins.build_engine import build_engine

    engine = tmp_path / "m.engine"
    build_engine(trt_export / "model.onnx", engine, max_batch=2)
    with get_runner("tensorrt", trt_export, engine=engine) as r:
        assert not r.metadata()["engine_built_here"]
        assert r.run(np.ones((2, 5), dtype=np.int64))["logits"].shape == (2, 5, 257)
        with pytest.raises(InputError, match=r"outside the engine's prefill profile"):
            r.run(np.ones((3, 5), dtype=np.int64))
    info = json.loads((tmp_path / "m.engine.json").read_text())
    info["export"]["model_sha256"] = "0" * 64
    (tmp_path / "m.engine.json").write_text(json.dumps(info))
    with pytest.raises(SMLPError, match="built from another model.onnx"):
        get_runner("tensorrt", trt_export, engine=engine).load()
    (tmp_path / "m.engine").write_bytes(b"not a plan")
    (tmp_path / "m.engine.json").write_text(json.dumps({**info, "export": {"model_sha256": _sha(trt_export)}}))
    with pytest.raises(SMLPError, match="TensorRT cannot load the engine"):
        get_runner("tensorrt", trt_export, engine=engine).load()


def _sha(out):
    from smlp_export.fsutil import sha256_file

    return sha256_file(out / "model.onnx")


def test_bench_times_the_engine(trt, trt_export, capsys, tmp_path):
    report = tmp_path / "bench.json"
    code, out, err = _run_cli(capsys, "bench", str(trt_export), "--backends", "tensorrt", "--batch", "1",
                              "--seq", "8", "--quick", "--json", str(report), "--no-progress")
    assert code == 0, err
    rows = json.loads(report.read_text())["rows"]
    assert [(r["backend"], r["status"]) for r in rows] == [("tensorrt", "ok")], rows
    assert rows[0]["p50_ms"] > 0
