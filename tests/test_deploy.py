"""`smlp deploy`: a Triton model repository whose config matches the exported graph."""
from __future__ import annotations

import json

import onnx
import pytest

from smlp_export import SMLPError, save_checkpoint
from smlp_export.deploy import write_triton_repository

from .conftest import micro_model


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from smlp_export.export.pipeline import export_model

    tmp = tmp_path_factory.mktemp("deploy")
    ckpt = save_checkpoint(micro_model(), tmp / "ckpt")
    export_model(str(ckpt), tmp / "out", target="ort", validate=False)
    return tmp / "out"


def test_repository_matches_graph(export_dir, tmp_path):
    from smlp_export.deploy.model_config import parse_config, pb

    rec = write_triton_repository(export_dir, tmp_path / "repo", name="smlp_micro")
    cfg = parse_config((tmp_path / "repo" / "smlp_micro" / "config.pbtxt").read_text())
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 8  # dynamic batching by default
    served = tmp_path / "repo" / "smlp_micro" / "1" / "model.onnx"
    assert served.read_bytes() == (export_dir / "model.onnx").read_bytes()
    g = onnx.load(str(served)).graph
    assert [t["name"] for t in rec["models"][0]["inputs"]] == [i.name for i in g.input]
    assert [t["name"] for t in rec["models"][0]["outputs"]] == [o.name for o in g.output]
    dims = {t.name: list(t.dims) for t in (*cfg.input, *cfg.output)}
    assert dims["input_ids"] == [-1]  # the batch axis belongs to Triton's batcher
    assert dims["logits"] == [-1, 257]
    assert [pb().DataType.Name(t.data_type) for t in cfg.input] == ["TYPE_INT64"]
    assert json.loads((tmp_path / "repo" / "smlp_deploy.json").read_text())["target"] == "ort"


def test_refuses_bad_inputs(export_dir, tmp_path):
    with pytest.raises(SMLPError, match="not an export directory"):
        write_triton_repository(tmp_path, tmp_path / "r1")
    write_triton_repository(export_dir, tmp_path / "r2")
    with pytest.raises(SMLPError, match="already exists"):
        write_triton_repository(export_dir, tmp_path / "r2")
    with pytest.raises(SMLPError, match="may only contain"):
        write_triton_repository(export_dir, tmp_path / "r3", name="a b")
    assert not (tmp_path / "r3").exists()


def test_refuses_failed_parity_and_changed_files(export_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    (bad / "parity.json").write_text(json.dumps({"passed": False}))
    with pytest.raises(SMLPError, match="failed parity"):
        write_triton_repository(bad, tmp_path / "r")
    (bad / "parity.json").unlink()
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(SMLPError, match="changed after export"):
        write_triton_repository(bad, tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.serving
def test_served_logits_equal_the_export(export_dir, tmp_path):
    """A real tritonserver (nvidia-pytriton's, python backend) returns the export's logits exactly."""
    pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton) for a local tritonserver")
    from smlp_export.deploy.server import check_repository

    write_triton_repository(export_dir, tmp_path / "repo", backend="python", name="m")
    res = check_repository(tmp_path / "repo", export_dir, model="m", cases=((1, 1), (3, 17), (2, 32)))
    assert res["passed"], res
    assert [(c["batch"], c["seq"]) for c in res["cases"]] == [(1, 1), (3, 17), (2, 32)]


# ---- issue 20: limits, overlapping paths, --check as the README writes it -------------------------------
def _cli(capsys, *argv):
    from smlp_cli.main import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("flag, value", [("--max-batch-size", 99999999999999), ("--threads", 10**20),
                                         ("--instances", 10**6), ("--queue-delay-us", 2**40)])
def test_deploy_refuses_numbers_triton_cannot_load(export_dir, tmp_path, capsys, flag, value):
    code, _, err = _cli(capsys, "deploy", export_dir, "-o", tmp_path / "r", flag, value)
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"error: {flag} must be an integer in ["), err
    assert not (tmp_path / "r").exists()


def test_deploy_refuses_an_output_that_overlaps_the_export(export_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(export_dir, out)
    before = sorted(p.name for p in out.iterdir())
    for repo, words in [(out, "is or holds the input"), (out / "repo", "is inside the export"),
                        (tmp_path, "is or holds the input")]:
        code, _, err = _cli(capsys, "deploy", out, "-o", repo, "--force")
        assert code == 1 and err.count("\n") == 1 and words in err, err
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.serving
def test_readme_check_command_serves_a_python_twin_and_leaves_no_pycache(export_dir, tmp_path, capsys):
    """`smlp deploy OUT -o REPO --check` (the README's command, onnxruntime backend): the local
    tritonserver has only the python backend, so the check serves a python-backend twin and says so;
    the repository written is the onnxruntime one, and the check leaves no __pycache__ anywhere in it."""
    pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton) for a local tritonserver")
    from smlp_export.deploy.model_config import parse_config

    code, out, err = _cli(capsys, "deploy", export_dir, "-o", tmp_path / "repo", "--check")
    assert code == 0, err
    assert "checking through a python-backend twin of" in out and "check passed" in out
    assert parse_config((tmp_path / "repo" / "smlp" / "config.pbtxt").read_text()).backend == "onnxruntime"
    python_repo = tmp_path / "py"
    code, out, err = _cli(capsys, "deploy", export_dir, "-o", python_repo, "--backend", "python", "--check")
    assert code == 0 and "check passed" in out, err
    assert (python_repo / "smlp" / "1" / "model.py").is_file()
    assert not [str(p) for p in python_repo.rglob("__pycache__")]


@pytest.mark.parametrize("server", ["127.0.0.1:99999", "", "127.0.0.1", "127.0.0.1:0", ":8001", "a b:8001",
                                    "127.0.0.1:80x"])
def test_generate_server_address_is_checked_before_dialing(capsys, server):
    code, _, err = _cli(capsys, "generate", "--server", server, "--prompt", "hi")
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: --server must be HOST:PORT with a port in 1..65535"), err


def test_server_addresses_that_are_fine():
    from smlp_export.deploy.client import check_server_address

    for ok in ("127.0.0.1:8001", "localhost:1", "[::1]:65535", "triton.example.com:443"):
        assert check_server_address(ok) == ok
