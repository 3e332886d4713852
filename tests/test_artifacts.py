"""The export folder's owner (smlp_export/artifacts.py): the typed manifest, paths that stay inside
the export, one clear line for a bad manifest / parity.json / graph, and where the export came from."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest

from smlp_export import save_checkpoint
from smlp_export.artifacts import (DECODE_FILE, MANIFEST_FILE, MODEL_FILE, PARITY_FILE, Manifest,
                                   checkpoint_of_export)
from smlp_export.errors import CheckpointError, InputError

from .conftest import micro_model, rehash_manifest, run_cli
from .conftest import one_error_line as one_line


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """tmp/ckpt and tmp/out: an export with decode graphs (no validation: not what is tested)."""
    from smlp_export.export.pipeline import export_model

    tmp = tmp_path_factory.mktemp("artifacts")
    ckpt = save_checkpoint(micro_model(), tmp / "ckpt")
    export_model(str(ckpt), tmp / "out", validate=False, decode=True)
    return tmp


@pytest.fixture
def out(exported, tmp_path) -> Path:
    """A private copy of the export (next to a link to its checkpoint, as in the original folder)."""
    shutil.copytree(exported / "out", tmp_path / "out")
    (tmp_path / "ckpt").symlink_to(exported / "ckpt")
    return tmp_path / "out"


def edit_manifest(out: Path, change) -> None:
    m = json.loads((out / MANIFEST_FILE).read_text())
    change(m)
    (out / MANIFEST_FILE).write_text(json.dumps(m))


def commands(out: Path, tmp_path: Path) -> list[list]:
    """The commands that read an export: each must refuse a bad one with one line, writing nothing."""
    return [["deploy", out, "-o", tmp_path / "repo"], ["inspect", out], ["validate", out, "--quick"],
            ["build-engine", out, "--dry-run"]]


# ---- the manifest ---------------------------------------------------------------------------------
def test_manifest_round_trips_and_records_no_host_path(exported) -> None:
    out = exported / "out"
    raw = json.loads((out / MANIFEST_FILE).read_text())
    m = Manifest.read(out)
    assert m.to_dict() == raw and m.target == "ort" and m.decode_path() == out / DECODE_FILE
    # which checkpoint made it: relative to the export, never the host's absolute path
    assert raw["checkpoint"]["path"] == "../ckpt" and str(exported) not in json.dumps(raw)
    assert Path(checkpoint_of_export(out)[0]).resolve() == (exported / "ckpt").resolve()
    assert m.verify_files().keys() == {f["name"] for f in raw["files"]}


def test_copied_export_says_its_checkpoint_is_gone(exported, tmp_path) -> None:
    shutil.copytree(exported / "out", tmp_path / "out")  # no ../ckpt beside the copy
    with pytest.raises(Exception, match="no longer exists"):
        checkpoint_of_export(tmp_path / "out")


def test_from_pretrained_of_an_export_says_what_it_is(exported) -> None:
    from smlp_export import SMLPForCausalLM

    with pytest.raises(CheckpointError, match="is an export directory, not a checkpoint") as e:
        SMLPForCausalLM.from_pretrained(exported / "out")
    assert "onnxruntime.InferenceSession" in str(e.value) and "config.json" not in str(e.value)


# ---- paths read from an export stay inside it ---------------------------------------------------------
@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/shadow", "sub/x.onnx", ".."])
def test_files_entry_leaving_the_export_is_refused(out, tmp_path, capsys, name) -> None:
    edit_manifest(out, lambda m: m["files"].append({"name": name, "bytes": 1, "sha256": "0" * 64}))
    for argv in commands(out, tmp_path):
        code, text, err = run_cli(capsys, *argv)
        line = one_line(err)
        assert code == 1 and "leave the export folder" in line and repr(name) in line, argv
    assert not (tmp_path / "repo").exists() and not (out / PARITY_FILE).exists()


def test_sequence_file_leaving_the_export_is_refused(out, tmp_path, capsys) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "private.onnx").write_bytes(b"secret")
    edit_manifest(out, lambda m: m["decode"]["sequence"].update(file="../victim/private.onnx"))
    code, _, err = run_cli(capsys, "deploy", out, "-o", tmp_path / "repo", "--backend", "python")
    assert code == 1 and "decode.sequence.file '../victim/private.onnx'" in one_line(err)
    assert not (tmp_path / "repo").exists()


def test_symlink_out_of_the_export_is_refused(out, tmp_path, capsys) -> None:
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(out / DECODE_FILE, outside)
    (out / DECODE_FILE).unlink()
    (out / DECODE_FILE).symlink_to(outside)
    code, _, err = run_cli(capsys, "deploy", out, "-o", tmp_path / "repo")
    assert code == 1 and "points outside the export folder" in one_line(err)


def test_external_data_outside_the_export_is_refused(out, tmp_path, capsys) -> None:
    """model.onnx whose weights live at ../outside/w.bin (checksums re-recorded, so only the
    location is wrong): deploy, validate and build-engine refuse it before reading a byte."""
    model = onnx.load(str(out / MODEL_FILE))
    (tmp_path / "outside").mkdir()
    onnx.save_model(model, str(out / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    shutil.move(out / "w.bin", tmp_path / "outside" / "w.bin")
    m = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside/w.bin"
    onnx.save_model(m, str(out / MODEL_FILE))
    rehash_manifest(out)
    for argv in (["deploy", out, "-o", tmp_path / "repo"], ["validate", out, "--quick"]):
        code, _, err = run_cli(capsys, *argv)
        line = one_line(err)
        assert code == 1 and "external data location" in line and "'../outside/w.bin'" in line, argv
    assert not (tmp_path / "repo").exists()


# ---- bad files: one clear line naming the file ----------------------------------------------------------
BAD_MANIFESTS = {
    "invalid JSON": "{not json",
    "not an object": "[1, 2]",
    "missing keys": json.dumps({"target": "ort"}),
    "wrong type": json.dumps({"target": "ort", "dtype": "fp32", "config": "x", "checkpoint": {}}),
    "nested 100000 deep": "[" * 100000 + "]" * 100000,
    "bad format": None,  # set below: an unknown format_version
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_is_one_line(out, tmp_path, capsys, case) -> None:
    if case == "bad format":
        edit_manifest(out, lambda m: m.update(format_version=99))
    else:
        (out / MANIFEST_FILE).write_text(BAD_MANIFESTS[case])
    for argv in commands(out, tmp_path):
        code, _, err = run_cli(capsys, *argv)
        line = one_line(err)
        assert code == 1 and str(out / MANIFEST_FILE) in line, (argv, line)
        assert not any(x in line for x in ("JSONDecodeError", "KeyError", "AttributeError", "RecursionError")), line
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("text", ["{oops", "[]", "[" * 100000 + "]" * 100000, '{"passed": "yes"}'])
def test_bad_parity_json_is_one_line(out, tmp_path, capsys, text) -> None:
    (out / PARITY_FILE).write_text(text)
    for argv in (["deploy", out, "-o", tmp_path / "repo"], ["inspect", out]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 1 and str(out / PARITY_FILE) in one_line(err), argv


def test_bad_graph_metadata_and_empty_graph_are_one_line(exported, tmp_path, capsys) -> None:
    m = onnx.load(str(exported / "out" / MODEL_FILE))
    for p in m.metadata_props:
        if p.key == "smlp.config":
            p.value = "[" * 100000
    onnx.save_model(m, str(tmp_path / "bad.onnx"))
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "junk.onnx").write_bytes(os.urandom(64))
    for name, want in (("bad.onnx", "metadata 'smlp.config' is not valid JSON"), ("empty.onnx", "not an ONNX model"),
                       ("junk.onnx", "ONNX")):
        code, _, err = run_cli(capsys, "inspect", tmp_path / name)
        line = one_line(err)
        assert code == 1 and want in line and str(tmp_path / name) in line, line


def test_manifest_reader_errors_are_input_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        Manifest.read(tmp_path / "nope")
    with pytest.raises(InputError, match="manifest.json is missing"):
        Manifest.read(tmp_path)
