"""Serving under load: dynamic batching (config + the python model's padding), a self-contained
repository, bad requests, and the load sweep against a real local tritonserver."""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smlp_export import SMLPError, save_checkpoint
from smlp_export.deploy import write_triton_repository
from smlp_export.deploy.full_model import check_request, plan_groups, run_group
from smlp_export.deploy.load import relative_error, serving_bound

from .conftest import mixing_model


def _export(tmp, decode: bool = False, **overrides) -> Path:
    from smlp_export.export.pipeline import export_model

    ckpt = save_checkpoint(mixing_model(**overrides), tmp / "ckpt")
    export_model(str(ckpt), tmp / "out", target="ort", validate=False, decode=decode)
    return tmp / "out"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def decode_export(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("serving_decode"), decode=True)


@pytest.fixture(scope="module")
def partial_export(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("serving_partial"), spatial_routing="partial")


def _session(export_dir):
    import onnxruntime as ort

    s = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return s, [o.name for o in s.get_outputs()]


def _windows(lengths, vocab=257, seed=0):
    from smlp_export.data import heldout_windows

    return [heldout_windows(1, t, offset=seed + 11 * i, vocab_size=vocab).numpy() for i, t in enumerate(lengths)]


# ---- the python model's batching, in-process on the real ONNX Runtime session ---------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 128), min_size=1, max_size=16), st.integers(1, 30))
def test_plan_groups_partitions_and_bounds_padding(lengths, p):
    groups = plan_groups(lengths, p)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each request exactly once
    for g in groups:
        ts = [lengths[i] for i in g]
        if min(ts) < p:  # shorter than the routing prefix: never padded
            assert len(set(ts)) == 1
        else:  # padded: at most doubles any member's length
            assert max(ts) <= 2 * min(ts) or max(ts) == 1


def test_padded_batches_equal_each_request_alone(export_dir):
    """Mixed lengths right-padded into one batch give every request its own logits (router outputs
    too): sMLP layers are causal, so padding after a request cannot reach it."""
    sess, outs = _session(export_dir)
    arrays = _windows([32, 17, 20, 30, 25, 9, 16])  # several share a power-of-two bucket
    groups = plan_groups([a.shape[1] for a in arrays], 1)
    assert any(len(g) > 1 for g in groups)
    bound = serving_bound("fp32")
    for g in groups:
        results = run_group(lambda ids: sess.run(outs, {"input_ids": ids}), [arrays[i] for i in g], outs)
        for i, got in zip(g, results):
            alone = sess.run(outs, {"input_ids": arrays[i]})
            for name, a, b in zip(outs, alone, got):
                assert relative_error(a, b) <= bound, (name, arrays[i].shape)
    # The comparison can see a padding bug: left padding (tokens shifted right) is far off.
    a, b = arrays[1], arrays[0]
    left = np.zeros((2, 32), np.int64)
    left[0, 32 - a.shape[1]:], left[1] = a[0], b[0]
    shifted = sess.run(["logits"], {"input_ids": left})[0][:1, 32 - a.shape[1]:]
    assert relative_error(sess.run(["logits"], {"input_ids": a})[0], shifted) > 100 * bound


def test_partial_routing_requests_shorter_than_p_are_not_padded(partial_export):
    """Partial-prediction routing reads the first p positions: padding a shorter request would
    change its routing, so it runs only with requests of its own length; longer ones pad exactly."""
    sess, outs = _session(partial_export)
    from smlp_export import preset

    p = preset("micro", spatial_routing="partial").prefix_len  # 7
    arrays = _windows([3, 32, 5, 3, 12, 9])
    groups = plan_groups([a.shape[1] for a in arrays], p)
    for g in groups:
        results = run_group(lambda ids: sess.run(outs, {"input_ids": ids}), [arrays[i] for i in g], outs)
        for i, got in zip(g, results):
            assert relative_error(sess.run(["logits"], {"input_ids": arrays[i]})[0], got[0]) <= serving_bound("fp32")
    # why: the same 3-token request padded to 32 is routed differently and far off
    padded = np.zeros((1, 32), np.int64)
    padded[:, :3] = arrays[0]
    far = sess.run(["logits"], {"input_ids": padded})[0][:, :3]
    assert relative_error(sess.run(["logits"], {"input_ids": arrays[0]})[0], far) > 100 * serving_bound("fp32")


def test_serving_bound_fails_at_1_7x_and_passes_at_half():
    rng = np.random.default_rng(0)
    local = rng.standard_normal((1, 9, 257)).astype(np.float32) * 20
    scale = float(np.abs(local).max())
    for dtype in ("fp32", "fp16", "bf16"):
        bound = serving_bound(dtype)
        for factor, ok in ((0.5, True), (1.7, False)):
            served = local.astype(np.float64).copy()
            served[0, 4, 100] += factor * bound * scale
            assert (relative_error(local, served) <= bound) is ok, (dtype, factor)
    assert relative_error(local, local[:, :8]) == float("inf")  # a response cut at the wrong length
    nan = local.copy()
    nan[0, 0, 0] = np.nan
    assert relative_error(local, nan) == float("inf")


@pytest.mark.parametrize("ids, words", [
    (np.zeros((1, 0), np.int64), "empty prompt"),
    (np.zeros((1, 33), np.int64), "longer than the model's max_seq_len 32"),
    (np.full((1, 3), 257, np.int64), "token id 257 outside the vocabulary [0, 257)"),
    (np.full((1, 3), -5, np.int64), "token id -5 outside"),
    (np.zeros((3,), np.int64), "shape [batch, tokens]"),
    (np.zeros((1, 3), np.int32), "INT64"),
])
def test_check_request_names_the_problem(ids, words):
    assert words in check_request(ids, {"max_seq_len": 32, "vocab_size": 257})


def test_check_request_accepts_the_edges():
    lim = {"max_seq_len": 32, "vocab_size": 257}
    assert check_request(np.zeros((1, 1), np.int64), lim) is None
    assert check_request(np.full((2, 32), 256, np.int64), lim) is None


# ---- the repository -------------------------------------------------------------------------------
def _parse(cfg: str):
    """Triton's own schema (tritonclient ships model_config.proto): a misspelt field fails here."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(cfg, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_batching_config_parses_with_tritons_schema(export_dir, tmp_path, backend):
    write_triton_repository(export_dir, tmp_path / "r", backend=backend, max_batch_size=16,
                            preferred_batch_sizes=(4, 16), queue_delay_us=250)
    c = _parse((tmp_path / "r" / "smlp" / "config.pbtxt").read_text())
    assert c.max_batch_size == 16
    assert list(c.dynamic_batching.preferred_batch_size) == [4, 16]
    assert c.dynamic_batching.max_queue_delay_microseconds == 250
    ins = {i.name: i for i in c.input}
    outs = {o.name: list(o.dims) for o in c.output}
    assert list(ins["input_ids"].dims) == [-1]  # the batch axis belongs to Triton
    assert outs["logits"] == [-1, 257]
    # only the python model pads requests itself; Triton's onnxruntime backend needs equal shapes
    assert ins["input_ids"].allow_ragged_batch is (backend == "python")
    with pytest.raises(Exception):
        _parse((tmp_path / "r" / "smlp" / "config.pbtxt").read_text().replace("max_queue_delay", "max_queue_dealy"))


def test_no_batching_keeps_the_graph_dims(export_dir, tmp_path):
    write_triton_repository(export_dir, tmp_path / "r", max_batch_size=0)
    c = _parse((tmp_path / "r" / "smlp" / "config.pbtxt").read_text())
    assert c.max_batch_size == 0 and not c.HasField("dynamic_batching")
    assert list(c.input[0].dims) == [-1, -1]


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_repository_is_self_contained_and_readable(decode_export, tmp_path, backend):
    """Every model of the repository (full, decode, sequence, generate) can be copied to a cluster:
    no host path in any text file, readable by any user, python models import nothing of ours."""
    old = os.umask(0o022)
    try:
        rec = write_triton_repository(decode_export, tmp_path / "r", backend=backend)
    finally:
        os.umask(old)
    repo = tmp_path / "r"
    assert {m["name"] for m in rec["models"]} >= {"smlp", "smlp_sequence"}
    hosts = {str(decode_export.resolve()), str(tmp_path), str(Path.home()), "/work/", "/tmp/"}
    import sys

    # the standard library, what the NGC image + the README's Dockerfile add, and files in the repo itself
    allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime", "triton_python_backend_utils", "smlp_sampling"}
    for p in repo.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o444 == 0o444, p  # any user (the server's) can read
        if p.is_file() and p.suffix in (".json", ".md", ".py", ".pbtxt"):
            text = p.read_text()
            assert not [h for h in hosts if h in text], (p, [h for h in hosts if h in text])
        if p.suffix == ".py":
            imports = set(re.findall(r"^\s*(?:import|from) ([A-Za-z_]+)", p.read_text(), re.M))
            assert imports <= allowed, (p, imports - allowed)
    readme = (repo / "README.md").read_text()
    assert "nvcr.io/nvidia/tritonserver" in readme and "--model-repository=/models" in readme
    if backend == "python":
        assert {"smlp_decode", "smlp_generate"} <= {m["name"] for m in rec["models"]}
        lim = json.loads((repo / "smlp" / "1" / "smlp_model.json").read_text())
        assert lim["max_seq_len"] == 32 and lim["vocab_size"] == 257 and lim["min_pad_tokens"] == 1
        assert "Dockerfile" in readme or "dockerfile" in readme


def test_bad_batching_options_refused_before_writing(export_dir, tmp_path):
    with pytest.raises(SMLPError, match="preferred batch size 16 outside"):
        write_triton_repository(export_dir, tmp_path / "r", max_batch_size=8, preferred_batch_sizes=(4, 16))
    with pytest.raises(SMLPError, match="needs batching"):
        write_triton_repository(export_dir, tmp_path / "r", max_batch_size=0, preferred_batch_sizes=(4,))
    assert not (tmp_path / "r").exists()


def test_cli_refusals_write_nothing(export_dir, tmp_path):
    from click.testing import CliRunner

    from smlp_cli.main import cli

    r = CliRunner()
    for args, words in ((["--concurrency", "1,4"], "--concurrency needs --check"),
                        (["--backend", "python", "--check", "--concurrency", "1,x"], "comma-separated"),
                        (["--backend", "python", "--check", "--concurrency", "0"], "in [1, 256]"),
                        (["--preferred-batch-sizes", "4,32"], "outside [1, --max-batch-size 8]")):
        res = r.invoke(cli, ["deploy", str(export_dir), "-o", str(tmp_path / "r"), *args])
        assert res.exit_code != 0 and words in res.output + str(res.exception), (args, res.output)
        assert not (tmp_path / "r").exists()


# ---- against a real tritonserver ------------------------------------------------------------------
@pytest.mark.serving
def test_load_sweep_against_a_real_server(export_dir, tmp_path):
    """`smlp deploy --backend python --check --concurrency 1,8 --requests N --json F`: the real
    tritonserver batches mixed-length requests (mean batch > 1 at 8 clients), every response equals
    the in-process run, bad requests get their own errors and the server keeps serving."""
    pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton) for a local tritonserver")
    from click.testing import CliRunner

    from smlp_cli.main import cli

    out = tmp_path / "load.json"
    res = CliRunner().invoke(cli, ["deploy", str(export_dir), "-o", str(tmp_path / "repo"), "--backend", "python",
                                   "--check", "--concurrency", "1,8", "--requests", "120",
                                   "--queue-delay-us", "2000", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    load = rep["load"]
    assert [r["concurrency"] for r in load] == [1, 8]
    for r in load:
        assert set(r) >= {"concurrency", "requests", "errors", "mismatches", "p50_ms", "p90_ms", "p99_ms",
                          "throughput_per_s"}
        assert r["requests"] == 120 and r["errors"] == 0 and r["mismatches"] == 0
        assert r["max_err_rel"] <= rep["check"]["bound"]
    assert load[0]["mean_batch"] == 1.0 and load[1]["mean_batch"] > 1.0  # the dynamic batcher batched
    assert all(b["passed"] for b in rep["check"]["bad_input"]) and len(rep["check"]["bad_input"]) == 5
    assert "check passed" in res.output
