"""export/weights.py: the export traces without data and writes every large weight from the
checkpoint one tensor at a time, with the same values the eager model holds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from smlp_export import save_checkpoint
from smlp_export.errors import CheckpointError
from smlp_export.export import weights
from smlp_export.export.graph import build_onnx
from smlp_export.artifacts import DATA_FILE, MODEL_FILE
from smlp_export.export.pipeline import export_model

from .conftest import micro_model

# n = 48: the spatial weights (48 x 48 = 2304 elements) are placeholders too, not only the experts
SHAPE = dict(max_seq_len=48, d_model=32, d_ffn=64, d_expert=64)


@pytest.fixture(scope="module")
def model():
    return micro_model(seed=5, **SHAPE)


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("w") / "m"
    save_checkpoint(model, d)
    return d


class Recording:
    """A WeightSource that records what was read (wraps the real safetensors source)."""

    def __init__(self, inner) -> None:
        self.inner, self.reads = inner, []

    def keys(self):
        return self.inner.keys()

    def get(self, name):
        x = self.inner.get(name)
        self.reads.append((name, x.numel()))
        return x


def test_tracing_reads_no_large_tensor_and_saving_reads_each_once(ckpt: Path, tmp_path: Path) -> None:
    m = weights.open_checkpoint(ckpt)
    assert all(p.is_meta for p in m.parameters())
    rec = Recording(m.weight_source)
    m.weight_source = rec
    proto = build_onnx(m, target="ort", dtype="fp32", opset=18, lazy=True)
    assert rec.reads and all(n <= weights.SMALL_NUMEL for _, n in rec.reads), "a large weight was read while tracing"
    lazy = weights.lazy_initializers(proto)
    assert lazy and not any(t.raw_data for t in lazy)
    assert {weights.recipe_of(t).source for t in lazy} >= {"blocks.1.tmoe.w1", "blocks.0.spatial.weight"}
    rec.reads.clear()
    weights.write_model(proto, tmp_path / "m.onnx", rec, external=True)
    assert len(rec.reads) == len(lazy)  # one read per placeholder, nothing else
    assert not weights.lazy_initializers(proto)


def _expected(sd: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    """What an ort-target initializer must hold, computed from the state dict by its name alone."""
    key = name.removeprefix("model.")
    steps = []
    while key not in sd:
        for suffix, step in ((".T", "T"), (".tril", "tril"), (".part0", "p0"), (".part1", "p1")):
            if key.endswith(suffix):
                key, steps = key[: -len(suffix)], [step, *steps]
                break
        else:
            return None  # an exporter-made constant
    a = sd[key]
    for step in steps:
        if step == "T":
            a = a.T
        elif step == "tril":
            a = np.tril(a)
        else:
            h = a.shape[-1] // 2
            a = a[..., :h] if step == "p0" else a[..., h:]
    return a


def test_written_weights_equal_the_eager_models(model, ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(weights, "EXTERNAL_DATA_THRESHOLD", 0)
    export_model(ckpt, tmp_path / "out", target="ort", validate=False)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "out" / MODEL_FILE)).graph.initializer}
    checked = {n for n in got if _expected(sd, n) is not None}
    assert any(n.endswith(".tril") for n in checked) and any(n.endswith(".part1") for n in checked)
    assert any(n.endswith(".T") for n in checked) and "model.blocks.1.tmoe.w1" in checked
    for n in checked:
        np.testing.assert_array_equal(got[n], _expected(sd, n), err_msg=n)


def test_external_export_is_byte_identical(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(weights, "EXTERNAL_DATA_THRESHOLD", 0)
    a = export_model(ckpt, tmp_path / "a", target="tensorrt", validate=False)
    b = export_model(ckpt, tmp_path / "b", target="tensorrt", validate=False)
    assert [f["name"] for f in a.manifest["files"]] == [MODEL_FILE, DATA_FILE]
    assert [f["sha256"] for f in a.manifest["files"]] == [f["sha256"] for f in b.manifest["files"]]


def test_decode_graph_with_external_data(model, ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    """A large model's decode.onnx gets decode.onnx.data; ONNX Runtime gives the same logits as the
    embedded form."""
    import onnxruntime as ort

    from smlp_export.decode.export import export_decode_graph

    export_decode_graph(model, tmp_path / "small" / "decode.onnx")
    monkeypatch.setattr(weights, "EXTERNAL_DATA_THRESHOLD", 0)
    res = export_model(ckpt, tmp_path / "big", target="ort", validate=False, decode=True)
    names = [f["name"] for f in res.manifest["files"]]
    assert names == [MODEL_FILE, DATA_FILE, "decode.onnx", "decode.onnx.data",
                     "decode_seq.onnx", "decode_seq.onnx.data"]
    assert res.manifest["decode"]["data_file"] == "decode.onnx.data"
    assert res.manifest["decode"]["sequence"]["data_file"] == "decode_seq.onnx.data"
    assert not (tmp_path / "small" / "decode.onnx.data").exists()
    feeds = {"input_ids": np.array([[3, 7, 9]], np.int64), "position": np.array(0, np.int64)}
    outs = []
    for d in (tmp_path / "small", tmp_path / "big"):
        s = ort.InferenceSession(str(d / "decode.onnx"), providers=["CPUExecutionProvider"])
        f = dict(feeds)
        for i in s.get_inputs()[2:]:
            f[i.name] = np.zeros([1, *i.shape[1:]], np.float32)
        outs.append(s.run(["logits"], f)[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.isfinite(outs[0]).all()


def test_non_finite_weight_fails_the_export_and_publishes_nothing(model, tmp_path: Path) -> None:
    bad = micro_model(seed=5, **SHAPE)
    with torch.no_grad():
        bad.blocks[1].tmoe.w1[0, 0, 0] = float("nan")  # a large tensor: read only while saving
    d = tmp_path / "bad"
    save_checkpoint(bad, d)
    with pytest.raises(CheckpointError, match="blocks.1.tmoe.w1 contains NaN or Inf"):
        export_model(d, tmp_path / "out", target="ort", validate=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_config_that_does_not_match_the_weights_is_refused(ckpt: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "mismatch"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["d_expert"] = 32
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config does not match the weights"):
        export_model(d, tmp_path / "out", target="ort", validate=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_source_reads_what_safetensors_reads(model, tmp_path: Path, dtype) -> None:
    """SafetensorsSource reads byte ranges itself (no mapping): every tensor equals safe_open's."""
    from safetensors import safe_open

    d = tmp_path / "ck"
    save_checkpoint(model, d, dtype=dtype)
    src = weights.SafetensorsSource(d / "model.safetensors")
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        assert src.keys() == sorted(f.keys())
        for k in src.keys():
            want, got = f.get_tensor(k), src.get(k)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), k


def test_a_truncated_weights_file_is_named(model, tmp_path: Path) -> None:
    d = tmp_path / "ck"
    save_checkpoint(model, d)
    wpath = d / "model.safetensors"
    src = weights.SafetensorsSource(wpath)
    last = max(src.keys(), key=lambda k: src._entries[k][2][1])  # the tensor at the file's end
    wpath.write_bytes(wpath.read_bytes()[:-8])
    with pytest.raises(ValueError, match=f"tensor '{last}': file ends after"):
        src.get(last)
