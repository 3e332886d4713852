"""`smlp deploy`: a Triton model repository whose config matches the exported graph."""
from __future__ import annotations

import json
import re

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


def _dims(text: str, name: str) -> list[int]:
    block = text[text.index(f'name: "{name}"'):]
    return [int(x) for x in re.search(r"dims: \[ ([^\]]*) \]", block).group(1).split(", ")]


def test_repository_matches_graph(export_dir, tmp_path):
    rec = write_triton_repository(export_dir, tmp_path / "repo", name="smlp_micro")
    cfg = (tmp_path / "repo" / "smlp_micro" / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in cfg and "max_batch_size: 8" in cfg  # dynamic batching by default
    served = tmp_path / "repo" / "smlp_micro" / "1" / "model.onnx"
    assert served.read_bytes() == (export_dir / "model.onnx").read_bytes()
    g = onnx.load(str(served)).graph
    assert [t["name"] for t in rec["models"][0]["inputs"]] == [i.name for i in g.input]
    assert [t["name"] for t in rec["models"][0]["outputs"]] == [o.name for o in g.output]
    assert _dims(cfg, "input_ids") == [-1]  # the batch axis belongs to Triton's batcher
    assert _dims(cfg, "logits") == [-1, 257]
    assert re.search(r'name: "input_ids"\s+data_type: TYPE_INT64', cfg)
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
