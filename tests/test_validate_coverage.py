"""The validator cannot be fooled: file checksums, dtype from the graph, every expert reached (also
through the ort target's fused short-input branch), decode checked to the last position."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from smlp_export.errors import InputError
from smlp_export.validate import TOLERANCES, run_validation

from .conftest import micro_model, mixing_model, rehash_manifest


def _scale_init(path, name: str, fn) -> None:
    m = onnx.load(str(path))
    init = next(i for i in m.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(init).copy()), name))
    onnx.save(m, str(path))


def _copy(src, dst):
    shutil.copytree(src, dst)
    # the manifest records its checkpoint relative to the export ("../ck"): keep it reachable
    ck = src.parent / "ck"
    if ck.exists() and not (dst.parent / "ck").exists():
        (dst.parent / "ck").symlink_to(ck)
    (dst / "parity.json").unlink(missing_ok=True)
    return dst


@pytest.fixture(scope="module")
def micro_export(tmp_path_factory):
    from smlp_export import save_checkpoint
    from smlp_export.export.pipeline import export_model

    d = tmp_path_factory.mktemp("cov")
    save_checkpoint(micro_model(seed=5), d / "ck")
    export_model(str(d / "ck"), d / "ort", target="ort", validate=False)
    return d / "ort"


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    """The embedded default model (8 token experts in blocks 2 and 5), ort target, ort_moe auto."""
    from smlp_export.export.pipeline import export_model

    out = tmp_path_factory.mktemp("default") / "ort"
    export_model("default", out, target="ort", validate=False)
    return out


# --- checksums and dtype ---------------------------------------------------------------------------

def test_relabelled_fp32_export_keeps_fp32_tolerances(micro_export, tmp_path):
    """manifest says fp16, the graph is fp32, and one expert's weights are 5 % off: fails, with the fp32 table."""
    bad = _copy(micro_export, tmp_path / "relabel")
    _scale_init(bad / "model.onnx", "model.blocks.1.tmoe.w2", lambda w: np.concatenate([w[:1] * 1.05, w[1:]]))
    _scale_init(bad / "model.onnx", "model.blocks.1.tmoe.w1", lambda w: np.concatenate([w[:1] * 1.05, w[1:]]))
    rehash_manifest(bad)  # a consistent manifest: the exporter itself wrote the wrong weights
    man = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**man, "dtype": "fp16"}))
    rep = run_validation(bad, "ort", quick=True)
    assert not rep.passed and rep.dtype == "fp32"
    assert rep.tolerances["max_abs_err_rel"] == TOLERANCES["fp32"].max_abs_err_rel
    assert any(f.startswith("dtype: manifest.json says 'fp16'") for f in rep.failures)
    assert any(f.startswith("max_abs_err_rel") for f in rep.failures)
    # ... and the corruption sits inside the fp16 bound: the manifest's label would have waved it through
    assert rep.metrics["max_abs_err_rel"] < TOLERANCES["fp16"].max_abs_err_rel


def test_changed_files_are_refused(micro_export, tmp_path):
    import subprocess
    import sys

    from smlp_export.deploy.triton import write_triton_repository

    bad = _copy(micro_export, tmp_path / "changed")
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(InputError, match="model.onnx has .* bytes but manifest.json records .*changed after export"):
        run_validation(bad, "ort", quick=True)
    with pytest.raises(InputError, match="changed after export"):
        write_triton_repository(bad, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() and not (bad / "parity.json").exists()
    r = subprocess.run([sys.executable, "-m", "smlp_cli.main", "validate", str(bad), "--quick"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "changed after export" in r.stderr
    # same size, different bytes: the sha256 catches it
    other = _copy(micro_export, tmp_path / "flipped")
    raw = bytearray((other / "model.onnx").read_bytes())
    raw[-5] ^= 1
    (other / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"model.onnx has sha256 .* but manifest.json records"):
        run_validation(other, "ort", quick=True)
    # a model file the manifest does not list
    extra = _copy(micro_export, tmp_path / "extra")
    shutil.copy(extra / "model.onnx", extra / "decode.onnx")
    with pytest.raises(InputError, match="decode.onnx is not listed in manifest.json"):
        run_validation(extra, "ort", quick=True)
    with pytest.raises(InputError, match="decode.onnx is not listed"):
        write_triton_repository(extra, tmp_path / "repo2")


# --- expert coverage (default model) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def default_quick(default_export):
    rep = run_validation(default_export, "ort", quick=True, write=False)
    assert rep.passed, rep.failures
    return rep


def test_quick_validation_reaches_every_expert(default_quick):
    cov = default_quick.coverage
    assert cov["experts"]["complete"] and cov["experts"]["experts_hit"] == cov["experts"]["experts"] == 2 * 8 + 2 * 4
    for name in ("blocks.2.tmoe", "blocks.5.tmoe"):
        layer = cov["experts"]["layers"][name]
        assert layer["experts_hit"] == 8 and min(layer["counts"]) >= 1
        fused = cov["fused_branch"]["layers"][name]
        assert fused["experts_hit"] == 8 and min(fused["counts"]) >= 1
    assert cov["fused_branch"]["max_tokens"] == 4
    fused_cases = [c for c in default_quick.cases if c["batch"] * c["seq"] <= 4]
    assert len(fused_cases) >= 6 and {c["seq"] for c in fused_cases} >= {1, 2, 3, 4}
    assert any(c["name"] == "expert_coverage" and c["ok"] for c in default_quick.checks)
    assert any(c["name"] == "fused_branch_expert_coverage" and c["ok"] for c in default_quick.checks)


@pytest.mark.parametrize("layer,expert", [("blocks.5", 0), ("blocks.2", 7)])
def test_quick_catches_one_corrupt_expert(default_export, tmp_path, monkeypatch, layer, expert):
    """x100 on one expert's fc2 (the issue's block 5 expert 0, and block 2's least-used expert).

    The base cases are cut to one token (1x1: one expert per layer) so that only the coverage
    search can reach the corrupted expert: whatever the base cases, coverage must complete."""
    import smlp_export.validate.parity as parity

    monkeypatch.setattr(parity, "CASES_QUICK", ((1, 1),))
    bad = _copy(default_export, tmp_path / "bad")

    def corrupt(w):
        w[expert] *= 100
        return w

    _scale_init(bad / "model.onnx", f"model.{layer}.tmoe.w2", corrupt)
    rehash_manifest(bad)
    rep = run_validation(bad, "ort", quick=True, write=False)
    assert rep.coverage["experts"]["complete"] and rep.coverage["fused_branch"]["complete"]
    assert not rep.passed and any(f.startswith("max_abs_err_rel") for f in rep.failures)


def test_fused_branch_expert_zeroed_fails(default_export, tmp_path):
    """Only the fused com.microsoft.MoE inside the If (<= 4 tokens) sees a zeroed expert fc2: long
    inputs are exact, so only the short-input cases can catch it."""
    bad = _copy(default_export, tmp_path / "fused")
    m = onnx.load(str(bad / "model.onnx"))
    w2 = next(i for i in m.graph.initializer if i.name == "model.blocks.5.tmoe.w2")
    arr = numpy_helper.to_array(w2).copy()
    arr[3] = 0
    m.graph.initializer.append(numpy_helper.from_array(arr, "fused_only_w2"))
    n_moe = 0
    for node in m.graph.node:
        if node.op_type == "If":
            then = next(a.g for a in node.attribute if a.name == "then_branch")
            for inner in then.node:
                if inner.op_type == "MoE" and inner.input[4] == "model.blocks.5.tmoe.w2":
                    inner.input[4] = "fused_only_w2"
                    n_moe += 1
    assert n_moe == 1
    onnx.save(m, str(bad / "model.onnx"))
    rehash_manifest(bad)
    rep = run_validation(bad, "ort", quick=True, write=False)
    assert not rep.passed
    worst = {c["case"]: c["max_abs_err_rel"] for c in rep.cases}
    tol = TOLERANCES["fp32"].max_abs_err_rel
    assert all(v <= tol for k, v in worst.items() if not k.startswith("fused") and k != "1x1")
    assert any(v > tol for k, v in worst.items() if k.startswith("fused"))


# --- decode graph: every position ----------------------------------------------------------------

def test_decode_validation_reaches_the_last_position(tmp_path):
    """Rows >= 97 of every spatial weight in decode.onnx scaled: only positions >= 97 change, and
    the teacher-forced sweep to max_seq_len - 1 catches it (greedy prompts stop near position 76)."""
    from smlp_export.decode.export import export_decode_graph
    from smlp_export.decode.validate import validate_decode

    m = mixing_model(max_seq_len=128)
    d = tmp_path / "dec"
    d.mkdir()
    section = export_decode_graph(m, d / "decode.onnx", target="ort", dtype="fp32", opset=18)
    (d / "manifest.json").write_text(json.dumps({"decode": section}))
    rep = validate_decode(d, m, quick=True)
    assert rep["passed"], rep["checks"]
    assert rep["positions_checked"] == [0, 127] and rep["teacher_forced"]["last_position"] == 127
    g = onnx.load(str(d / "decode.onnx"))
    n_changed = 0
    for init in g.graph.initializer:
        if list(init.dims[-2:]) == [128, 128]:
            w = numpy_helper.to_array(init).copy()
            w[..., 97:, :] *= 1.5
            init.CopyFrom(numpy_helper.from_array(w, init.name))
            n_changed += 1
    assert n_changed >= 3  # one dense spatial weight + two sMoE weights
    onnx.save(g, str(d / "decode.onnx"))
    rep = validate_decode(d, m, quick=True)
    assert not rep["passed"]
    assert rep["teacher_forced"]["worst_position"] >= 97
    assert max(r["prompt_tokens"] + r["new_tokens"] for r in rep["rows"]) < 97  # greedy alone: blind


def test_synthetic_fallback_when_held_out_text_reaches_no_expert(micro_export, monkeypatch, tmp_path):
    """If the held-out windows searched for coverage reach nothing new (here: replaced by one
    repeated byte), seeded synthetic windows complete the coverage; they add no perplexity tokens."""
    import torch

    import smlp_export.validate.parity as parity
    from smlp_export import data

    real = data.heldout_windows
    L = 32  # micro max_seq_len: coverage windows are L + 1 tokens

    def flat(n, seq_len, source=None, offset=0, vocab_size=None):
        if seq_len == L + 1 and offset >= parity.COVERAGE_OFFSET // (L + 1):  # only the coverage search
            return torch.full((n, seq_len), ord(" "), dtype=torch.int64)
        return real(n, seq_len, source, offset, vocab_size=vocab_size)

    from smlp_export.export.pipeline import export_model

    out = tmp_path / "portable"  # no fused branch: only the main coverage search adds cases
    export_model(str(micro_export.parent / "ck"), out, target="portable", validate=False)
    monkeypatch.setattr(data, "heldout_windows", flat)
    monkeypatch.setattr(parity, "CASES_QUICK", ((1, 1),))
    rep = run_validation(out, "ort", quick=True, write=False)
    assert rep.passed, rep.failures
    assert rep.coverage["experts"]["complete"]
    synth = [c for c in rep.cases if c.get("synthetic")]
    assert synth and all(c["ppl_tokens"] == 0 for c in synth) and synth[0]["case"].startswith("coverage synthetic")
