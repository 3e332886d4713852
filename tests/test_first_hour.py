"""Issue 20, what a newcomer and an attacker met in the first hour: --force that never replaces an
input or a folder of other files, the validate / export --force race, Polygraphy save paths,
progress and --quiet, and one-line errors for the remaining hostile inputs."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from smlp_export import fsutil, save_checkpoint
from smlp_export.errors import SMLPError

from .conftest import micro_model, one_error_line, run_cli


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(micro_model(), tmp_path_factory.mktemp("ck") / "ckpt")


@pytest.fixture(scope="module")
def export_dir(ckpt, tmp_path_factory) -> Path:
    from smlp_export.export.pipeline import export_model

    out = tmp_path_factory.mktemp("ex") / "out"
    export_model(str(ckpt), out, validate=False)
    return out


# ---- --force replaces only what smlp wrote, never an input ---------------------------------------
def test_export_onto_its_own_checkpoint_is_refused(ckpt, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(ckpt, ck)
    before = tree(ck)
    for out in (ck, tmp_path):  # the checkpoint itself, and a folder holding it
        code, _, err = run_cli(capsys, "export", ck, "-o", out, "--force", "--no-validate")
        assert code == 1 and "is or holds the input" in one_error_line(err), err
    assert tree(ck) == before


def test_convert_into_the_folder_of_its_source_is_refused(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "g.pt").write_bytes(b"anything: refused before it is read")
    (d / "notes.txt").write_text("mine")
    before = tree(d)
    code, _, err = run_cli(capsys, "convert", d / "g.pt", "-o", d, "--from", "g-mlp-pytorch", "--causal", "--force")
    assert code == 1 and "is or holds the input" in one_error_line(err)
    assert tree(d) == before


def test_init_force_keeps_a_folder_of_other_files_and_replaces_a_checkpoint(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(capsys, "init", "--preset", "micro", "-o", d, "--force")
    line = one_error_line(err)
    assert code == 1 and "not a checkpoint, export or model repository written by smlp" in line
    assert (d / "thesis.tex").read_text() == "years of work" and len(list(d.iterdir())) == 1
    # an earlier checkpoint is replaced, and so is an empty folder
    ck, empty = tmp_path / "ck", tmp_path / "empty"
    empty.mkdir()
    for out in (ck, ck, empty):
        code, _, err = run_cli(capsys, "init", "--preset", "micro", "-o", out, "--force", "--seed", "1")
        assert code == 0, err
    assert (ck / "metadata.json").is_file() and (empty / "model.safetensors").is_file()
    # a plain file is not replaced
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = run_cli(capsys, "init", "--preset", "micro", "-o", f, "--force")
    assert code == 1 and "is not a directory" in one_error_line(err) and f.read_text() == "x"


@pytest.mark.parametrize("out", ["", "."])
def test_init_into_no_name_or_the_current_directory(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").write_text("x")
    code, _, err = run_cli(capsys, "init", "--preset", "micro", "-o", out, "--force")
    line = one_error_line(err)
    assert code == 1 and ("path is empty" in line if out == "" else "current directory" in line)
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_deploy_onto_its_own_export_is_refused(export_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(export_dir, out)
    before = tree(out)
    code, _, err = run_cli(capsys, "deploy", out, "-o", out, "--force")
    assert code == 1 and "is or holds the input" in one_error_line(err)
    assert tree(out) == before


def test_train_force_never_replaces_its_init_checkpoint(ckpt, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(ckpt, ck)
    before = tree(ck)
    code, _, err = run_cli(capsys, "train", "--init-from", ck, "-o", ck, "--force", "--steps", "1")
    assert code == 1 and "is or holds the input" in one_error_line(err)
    assert tree(ck) == before


def test_publish_rechecks_what_it_replaces(tmp_path):
    """A folder that became something else after the command's first check is not replaced."""
    target, tmp = tmp_path / "out", tmp_path / ".out.tmp"
    target.mkdir()
    (target / "user.txt").write_text("x")
    tmp.mkdir()
    with pytest.raises(SMLPError, match="not a checkpoint, export or model repository"):
        fsutil.publish_dir(tmp, target, overwrite=True)
    assert (target / "user.txt").read_text() == "x"


# ---- validate racing export --force -------------------------------------------------------------
def test_validate_never_writes_parity_into_an_export_that_replaced_its_own(export_dir, tmp_path, monkeypatch):
    from smlp_export.validate import parity

    out, new = tmp_path / "out", tmp_path / ".new"
    shutil.copytree(export_dir, out)
    shutil.copytree(export_dir, new)
    (new / "marker").write_text("the new export")

    real = parity._check_plugin_attributes

    def replace_meanwhile(*a, **k):  # `smlp export --force` publishing while validate runs
        fsutil.publish_dir(new, out, overwrite=True)
        return real(*a, **k)

    monkeypatch.setattr(parity, "_check_plugin_attributes", replace_meanwhile)
    with pytest.raises(SMLPError, match="was replaced while it was being validated"):
        parity.run_validation(out, quick=True)
    assert (out / "marker").is_file() and not (out / "parity.json").exists()


# ---- --save-inputs / --save-outputs: refused before validation runs -------------------------------
@pytest.mark.parametrize("case", ["same", "graph", "inside", "under_a_file", "dir"])
def test_polygraphy_save_paths_refused_before_validation(export_dir, tmp_path, capsys, monkeypatch, case):
    from smlp_export.validate import parity

    out = tmp_path / "out"
    shutil.copytree(export_dir, out)
    before = tree(out)
    (tmp_path / "file").write_text("x")

    def started(*a, **k):
        raise AssertionError("validation ran before the paths were checked")

    monkeypatch.setattr(parity, "_load_reference_model", started)
    f, g = {"same": (tmp_path / "a.json", tmp_path / "a.json"),
            "graph": (tmp_path / "a.json", out / "model.onnx"),
            "inside": (out / "in.json", tmp_path / "b.json"),
            "under_a_file": (tmp_path / "file" / "x.json", tmp_path / "b.json"),
            "dir": (tmp_path, tmp_path / "b.json")}[case]
    code, text, err = run_cli(capsys, "validate", out, "--save-inputs", f, "--save-outputs", g)
    line = one_error_line(err)
    assert code == 1 and text == "", err
    assert {"same": "is the same file as --save-inputs", "graph": "is inside the export",
            "inside": "is inside the export", "under_a_file": "is not a directory",
            "dir": "is a directory"}[case] in line
    assert tree(out) == before and not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


# ---- one line, whatever the path holds ------------------------------------------------------------
def test_a_newline_in_a_path_stays_on_the_error_line(tmp_path, capsys):
    bad = tmp_path / "two\nlines"
    code, _, err = run_cli(capsys, "export", bad, "-o", tmp_path / "x", "--no-validate")
    line = one_error_line(err)
    assert code == 1 and "two\\nlines" in line


@pytest.mark.parametrize("file", ["config.json", "metadata.json", "smlp_tokenizer.json"])
def test_json_nested_100000_deep_is_one_line(ckpt, tmp_path, capsys, file):
    ck = tmp_path / "ck"
    shutil.copytree(ckpt, ck)
    (ck / file).write_text("[" * 100000 + "]" * 100000)
    code, _, err = run_cli(capsys, "inspect", ck, "--no-heldout")
    line = one_error_line(err)
    assert code == 1 and f"{file}: not a checkpoint file (JSON nested too deeply" in line, line


# ---- progress on stderr: stages and case counters on a terminal, nothing with --quiet or a pipe ----
def _on_a_terminal(argv: list[str], timeout: float = 600) -> tuple[int, str, str]:
    """Run `smlp ARGV` with stderr on a pseudo-terminal (stdout a pipe): (code, stdout, stderr)."""
    import pty
    import subprocess
    import sys
    import threading

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    # a real terminal has a size; a fresh pty is 0 x 0, where tqdm draws an empty bar
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "smlp_cli.main", *argv], stdout=subprocess.PIPE, stderr=slave,
                         stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # a full pty buffer would block the child's progress writes
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:  # EIO once the child closed its end
                return
            if not b:
                return
            chunks.append(b)

    t = threading.Thread(target=drain)
    t.start()
    out, _ = p.communicate(timeout=timeout)
    t.join(timeout=30)
    os.close(master)
    return p.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_export_and_validate_show_stages_and_cases_on_a_terminal_only(ckpt, tmp_path):
    out = tmp_path / "out"
    code, text, err = _on_a_terminal(["export", str(ckpt), "-o", str(out), "--quick"])
    assert code == 0, err
    assert "export: trace + translate" in err and "export: validate" in err
    assert "validate ort: 3 held-out cases" in err and " cases" in err  # the validation's case counter
    assert "exported" in text and "export:" not in text  # the summary on stdout, progress never
    code, text, err = _on_a_terminal(["validate", str(out), "--quick", "--quiet"])
    assert code == 0 and "PASSED" in text and err.strip() == "", err
    code, text, err = _on_a_terminal(["export", str(ckpt), "-o", str(tmp_path / "o2"), "--no-validate", "-q"])
    assert code == 0 and err.strip() == "", err


def test_no_progress_when_stderr_is_not_a_terminal(export_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(export_dir, out)
    code, text, err = run_cli(capsys, "validate", out, "--quick")
    assert code == 0 and "PASSED" in text and err == ""


# ---- generate says which runtime generated; an export's own graph by default ----------------------
@pytest.fixture(scope="module")
def decode_export(ckpt, tmp_path_factory) -> Path:
    from smlp_export.export.pipeline import export_model

    out = tmp_path_factory.mktemp("dec") / "out"
    export_model(str(ckpt), out, validate=False, decode=True)
    return out


def test_generate_from_an_export_runs_its_decode_graph(decode_export, capsys):
    code, text, err = run_cli(capsys, "generate", decode_export, "--prompt", "def ", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    d = json.loads(text)
    assert d["backend"] == "ort" and d["runtime"] == "ONNX Runtime on the export's decode.onnx"
    code, text, err = run_cli(capsys, "generate", decode_export, "--prompt", "def ", "--max-new-tokens", "3")
    assert code == 0 and err.strip().splitlines()[-1].endswith("generated by ONNX Runtime on the export's decode.onnx")


def test_generate_from_an_export_without_decode_graph_says_it_runs_pytorch(export_dir, ckpt, capsys):
    code, text, err = run_cli(capsys, "generate", export_dir, "--prompt", "def ", "--max-new-tokens", "3")
    assert code == 0, err
    assert "has no decode graph, so its checkpoint runs on PyTorch" in err and "--decode" in err
    assert "generated by PyTorch on the export's checkpoint" in err.strip().splitlines()[-1]
    code, text, err = run_cli(capsys, "generate", ckpt, "--prompt", "def ", "--max-new-tokens", "3")
    assert code == 0 and err.strip().splitlines()[-1].endswith(f"generated by PyTorch on the checkpoint {ckpt}")


# ---- inspect: why measured and recorded ppl differ; rounded parity error ---------------------------
def test_inspect_says_why_its_ppl_differs_from_the_recorded_one(capsys):
    code, text, err = run_cli(capsys, "inspect", "--windows", "4")
    assert code == 0, err
    rec = next(x for x in text.splitlines() if x.startswith("trained"))
    assert "over 32,768 tokens at the end of training" in rec
    assert "over 512 tokens (the first 4 held-out windows)" in text
    assert "differs from the recorded ppl by sample: 512 of the 32,768 held-out tokens it was measured on; " \
           "--windows 256 reproduces it" in text


def test_inspect_export_rounds_the_parity_error_and_names_it(export_dir, tmp_path, capsys):
    from smlp_export.validate import run_validation

    out = tmp_path / "out"
    shutil.copytree(export_dir, out)
    rep = run_validation(out, quick=True)
    code, text, err = run_cli(capsys, "inspect", out)
    line = next(x for x in text.splitlines() if x.startswith("parity"))
    want = f"largest logits error / logits scale {rep.metrics['max_abs_err_rel']:.3g} (limit 0.0001)"
    assert code == 0 and want in line and repr(rep.metrics["max_abs_err_rel"]) not in line, line


# ---- convert: memory estimate before materialising; what a refused pickle holds --------------------
def test_convert_refuses_stride0_views_that_would_not_fit(tmp_path, capsys, monkeypatch):
    from smlp_export import memory

    src = tmp_path / "views.pt"
    one = torch.zeros(1)
    torch.save({"to_embed.weight": one.expand(50000, 40000), "to_logits.1.weight": one.expand(50000, 40000)}, src)
    assert src.stat().st_size < 10_000
    monkeypatch.setattr(memory, "available_bytes", lambda: 4 * memory.GiB)
    monkeypatch.delenv("SMLP_SKIP_MEMORY_CHECK", raising=False)
    code, _, err = run_cli(capsys, "convert", src, "-o", tmp_path / "out", "--from", "g-mlp-pytorch", "--causal")
    line = one_error_line(err)
    assert code == 1 and "its tensors hold 14.9 GiB in float32 (the file stores" in line
    assert "views that repeat it" in line and "only 4.0 GiB is available" in line
    assert not (tmp_path / "out").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo never-run",))


def test_a_pickled_os_system_is_named_as_a_forbidden_global(tmp_path, capsys):
    src = tmp_path / "evil.pt"
    torch.save({"config": {}, "state_dict": {}, "x": _Evil()}, src)
    code, _, err = run_cli(capsys, "inspect", src, "--allow-pickle", "--no-heldout")
    line = one_error_line(err)
    assert code == 1 and "holds a forbidden global posix.system" in line and "corrupt" not in line
    code, _, err = run_cli(capsys, "convert", src, "-o", tmp_path / "o", "--from", "g-mlp-pytorch", "--causal")
    line = one_error_line(err)
    assert code == 1 and "it references posix.system" in line
    for text in (line, err):
        assert "will likely succeed" not in text and "weights_only` set to `False" not in text


# ---- flags users bring from perf_analyzer / Polygraphy ---------------------------------------------
def test_concurrency_range_like_perf_analyzer(export_dir, tmp_path, capsys):
    from smlp_export.deploy.load import parse_concurrency_range

    assert parse_concurrency_range("1:16:4") == [1, 5, 9, 13]
    assert parse_concurrency_range("2:4") == [2, 3, 4]
    for bad in ("16:1", "1:16:0", "a:b", "1", "0:4", "1:300"):
        with pytest.raises(SMLPError, match="--concurrency-range"):
            parse_concurrency_range(bad)
    # it reaches deploy's own load-sweep option: the same rule (needs --check) applies to it
    code, _, err = run_cli(capsys, "deploy", export_dir, "-o", tmp_path / "r", "--concurrency-range", "1:16:4")
    assert code == 1 and "--concurrency needs --check" in one_error_line(err) and not (tmp_path / "r").exists()
    code, _, err = run_cli(capsys, "deploy", export_dir, "-o", tmp_path / "r", "--concurrency", "1",
                           "--concurrency-range", "1:4")
    assert code == 1 and "not both" in one_error_line(err)


@pytest.mark.parametrize("flag, value, says", [("--providers", "cuda", "--backends ort (CPU), ort-cuda (CUDA)"),
                                               ("--concurrency-range", "1:16:4", "smlp deploy OUT -o REPO")])
def test_bench_says_which_flag_to_use_instead(capsys, flag, value, says):
    code, _, err = run_cli(capsys, "bench", flag, value)
    line = one_error_line(err)
    assert code == 1 and f"{flag} is not an option of `smlp bench`" in line and says in line


def test_validate_accepts_polygraphy_providers(export_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(export_dir, out)
    code, text, err = run_cli(capsys, "validate", out, "--quick", "--providers", "cpu", "--json")
    assert code == 0, err
    assert json.loads(text)["backend_metadata"]["providers"] == ["CPUExecutionProvider"]


def test_export_never_replaces_the_embedded_default_model(tmp_path, capsys):
    from smlp_export.checkpoint import default_checkpoint_dir

    d = default_checkpoint_dir()
    before = tree(d)
    code, _, err = run_cli(capsys, "export", "-o", d, "--force", "--no-validate")
    assert code == 1 and "is or holds the input" in one_error_line(err)
    assert tree(d) == before
