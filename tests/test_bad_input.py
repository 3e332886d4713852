"""Hostile and careless input (issue 11): one clear error line naming what is wrong, exit 1,
nothing half-written; concurrent and killed writers; permissions a server user can read."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from smlp_cli.main import main
from smlp_export import CheckpointError, ConfigError, load_checkpoint, preset, save_checkpoint
from smlp_export import fsutil
from smlp_export.checkpoint import TOKENIZER_FILE
from smlp_export.errors import InputError

from .conftest import micro_model, one_error_line, run_cli


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("layer_norm_eps", "x", "layer_norm_eps must be a number, got 'x'"),
    ("layer_norm_eps", float("inf"), "layer_norm_eps must be finite"),
    ("layer_norm_eps", True, "layer_norm_eps must be a number, got True"),
    ("spatial_init_eps", float("nan"), "spatial_init_eps must be finite"),
    ("spatial_init_eps", "abc", "spatial_init_eps must be a number, got 'abc'"),
    ("spatial_init_eps", -1e-3, "spatial_init_eps must be >= 0"),
    ("partial_fraction", float("nan"), "partial_fraction must be finite"),
    ("partial_fraction", True, "partial_fraction must be a number"),
    ("vocab_size", 257.5, "vocab_size must be an integer, got 257.5"),
    ("n_layers", 3.0, "n_layers must be an integer"),
    ("d_model", False, "d_model must be an integer"),
    ("eos_token_id", True, "eos_token_id must be an integer or null"),
    ("eos_token_id", 256.0, "eos_token_id must be an integer or null"),
    ("token_routing", 3, "token_routing must be a string"),
])
def test_config_refuses_bad_field_naming_it(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preset("micro", **{field: value})


@pytest.mark.parametrize("setting, message", [
    ("layer_norm_eps=x", "layer_norm_eps must be a number, got 'x'"),
    ("layer_norm_eps=Infinity", "layer_norm_eps must be finite, got inf"),
    ("spatial_init_eps=NaN", "spatial_init_eps must be finite, got nan"),
    ("spatial_init_eps=abc", "spatial_init_eps must be a number, got 'abc'"),
    ("vocab_size=257.5", "vocab_size must be an integer, got 257.5"),
    ("eos_token_id=true", "eos_token_id must be an integer or null, got True"),
    ("heads=4", "unknown field.*heads"),
])
def test_init_set_refuses_bad_values(tmp_path, capsys, setting, message):
    import re

    code, _, err = run_cli(capsys, "init", "--preset", "micro", "--set", setting, "-o", tmp_path / "c")
    assert code == 1 and re.search(message, one_error_line(err)), err
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_config_with_infinity_is_refused_naming_the_field(tmp_path):
    d = save_checkpoint(micro_model(), tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["layer_norm_eps"] = float("inf")
    (d / "config.json").write_text(json.dumps(cfg))  # json writes Infinity, and reads it back
    with pytest.raises(CheckpointError, match="layer_norm_eps must be finite"):
        load_checkpoint(d)


# ---- tokenizer.json ----------------------------------------------------------------------------
def _edit_tokenizer(d: Path, **changes) -> None:
    tok = json.loads((d / TOKENIZER_FILE).read_text())
    tok.update(changes)
    (d / TOKENIZER_FILE).write_text(json.dumps(tok))


def test_tokenizer_eos_must_match_config(tmp_path):
    d = save_checkpoint(micro_model(), tmp_path / "c")
    _edit_tokenizer(d, eos_token_id=10)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: eos_token_id 10 != config eos_token_id 256"):
        load_checkpoint(d)


@pytest.mark.parametrize("value", [257.5, "257", True])
def test_tokenizer_vocab_size_must_be_an_integer(tmp_path, value):
    d = save_checkpoint(micro_model(), tmp_path / "c")
    _edit_tokenizer(d, vocab_size=value)
    with pytest.raises(CheckpointError, match="vocab_size must be an integer"):
        load_checkpoint(d)


def test_eos_zero_is_saved_as_zero(tmp_path):
    """eos_token_id 0 is a token id, not "unset": the saved tokenizer must agree with the config."""
    torch.manual_seed(0)
    from smlp_export import SMLPForCausalLM

    m = SMLPForCausalLM(preset("micro", eos_token_id=0))
    d = save_checkpoint(m, tmp_path / "c")
    assert json.loads((d / TOKENIZER_FILE).read_text())["eos_token_id"] == 0
    assert load_checkpoint(d).tokenizer.eos_token_id == 0


# ---- generate options ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan"], "--temperature must be a finite number, got 'nan'"),
    (["--temperature", "inf"], "--temperature must be a finite number, got 'inf'"),
    (["--temperature", "-0.5"], "--temperature must be >= 0, got '-0.5'"),
    (["--seed", "-1"], r"--seed must be in \[0, 4294967295\], got '-1'"),
])
def test_generate_options_refused_before_any_output(capsys, argv, message):
    import re

    code, out, err = run_cli(capsys, "generate", "--prompt", "def ", "--max-new-tokens", "2", *argv)
    assert code == 1 and re.search(message, one_error_line(err)), err
    assert out == ""  # nothing streamed


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "micro", "--lr", "nan", "-o", "{tmp}/t"], "--lr must be a finite number"),
    (["train", "--preset", "micro", "--lr", "0", "-o", "{tmp}/t"], "--lr must be > 0"),
    (["train", "--preset", "micro", "--seed", "-3", "-o", "{tmp}/t"], "--seed must be in"),
    (["bench", "--min-time", "nan"], "--min-time must be a finite number"),
    (["bench", "--max-time", "inf"], "--max-time must be a finite number"),
    (["init", "--preset", "micro", "--seed", "99999999999", "-o", "{tmp}/t"], "--seed must be in"),
])
def test_numeric_options_of_other_commands(tmp_path, capsys, argv, message):
    import re

    code, out, err = run_cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 1 and re.search(message, one_error_line(err)), err
    assert out == "" and list(tmp_path.iterdir()) == []


def test_generator_api_refuses_nan_temperature_and_negative_seed():
    from smlp_export.decode.runtime import TorchGenerator

    gen = TorchGenerator(micro_model())
    with pytest.raises(InputError, match="temperature must be a finite number"):
        gen.generate([1, 2, 3], 2, temperature=float("nan"))
    with pytest.raises(InputError, match="seed must be an integer >= 0"):
        gen.generate([1, 2, 3], 2, temperature=1.0, seed=-1)


def test_tiny_temperature_samples_the_argmax_not_token_zero():
    """logits / 1e-310 overflows to inf; inf - inf = nan made every draw token 0."""
    from smlp_export.decode.runtime import choose

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 257)).astype(np.float32) * 3
    want = [int(np.argmax(row)) for row in logits]  # oracle: plain argmax, row by row
    for t in (1e-310, 1e-30):
        got = choose(logits, t, None, np.random.default_rng(1))
        assert got.tolist() == want


def test_non_utf8_prompt_is_one_line():
    """Bytes that are not UTF-8 reach Python as surrogate escapes; they must not crash the encoder."""
    r = subprocess.run([sys.executable, "-m", "smlp_cli.main", "generate", "--prompt", b"ab\xff",
                        "--max-new-tokens", "2"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    line = one_error_line(r.stderr)
    assert "--prompt is not valid UTF-8 (byte 0xff at position 2)" in line
    from smlp_export.tokenizer import ByteTokenizer

    with pytest.raises(InputError, match="not valid UTF-8"):
        ByteTokenizer().encode("ab\udcff")


# ---- weights-only loads ----------------------------------------------------------------------------
def test_allow_pickle_failure_never_advises_weights_only_false(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    torch.save({"config": preset("micro").to_dict(), "state_dict": {}, "x": object()}, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, allow_pickle=True)
    msg = str(e.value)
    assert "\n" not in msg and "weights_only` set to `False" not in msg and "weights_only=False" not in msg
    assert "not a tensor or plain container" in msg
    code, _, err = run_cli(capsys, "inspect", p, "--allow-pickle", "--no-heldout")
    assert code == 1 and "False" not in one_error_line(err)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    corpus = tmp / "c.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 100)
    out = tmp / "t"
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "micro", "--corpus", str(corpus), "--steps", "1", "--batch-size", "2",
              "--eval-every", "1", "--threads", "1", "-o", str(out)])
        raise SystemExit(0)
    assert e.value.code == 0
    return out, corpus


@pytest.mark.parametrize("defect, message", [
    ("evil", "cannot load with weights_only=True: it holds a forbidden global object, a Python object"),
    ("garbage", "not a torch.save file, or corrupt"),
    ("keys", r"not a trainer state \(missing rng"),
    ("config", "saved for a different model config"),
])
def test_resume_with_bad_state_is_one_line(trained, tmp_path, capsys, defect, message):
    import re
    import shutil

    src, corpus = trained
    out = tmp_path / "t"
    shutil.copytree(src, out)
    state = out / "trainer_state.pt"
    extra = []
    if defect == "evil":
        torch.save({"x": object()}, state)
    elif defect == "garbage":
        state.write_bytes(b"not a torch file")
    elif defect == "keys":
        st = torch.load(state, weights_only=True)
        del st["rng"]
        torch.save(st, state)
    else:
        extra = ["--set", "d_model=16"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(capsys, "train", "--preset", "micro", *extra, "--corpus", corpus, "--steps", "2",
                           "--batch-size", "2", "--threads", "1", "--resume", "-o", out)
    line = one_error_line(err)
    assert code == 1 and re.search(message, line) and "weights_only=False" not in line, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


# ---- publishing: races, killed writers, symlinks, modes ---------------------------------------------
def test_publish_race_exactly_one_wins(tmp_path):
    """16 threads publish to the same new name at once: one wins, 15 get FileExistsError."""
    target = tmp_path / "OUT"
    tmps = []
    for i in range(16):
        t = fsutil.temp_dir_for(target)
        (t / "who").write_text(str(i))
        tmps.append(t)
    barrier = threading.Barrier(len(tmps))
    results: list[object] = [None] * len(tmps)

    def go(i):
        barrier.wait()
        try:
            fsutil.publish_dir(tmps[i], target, overwrite=False)
            results[i] = "won"
        except FileExistsError:
            results[i] = "lost"

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(tmps))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results.count("won") == 1 and results.count("lost") == 15
    assert (target / "who").read_text() == str(results.index("won"))


def test_publish_without_force_refuses_an_out_that_appeared_meanwhile(tmp_path):
    """The check at the start and the rename at the end are apart: another export may publish
    between them (here: from the progress callback). It must not be moved aside and replaced."""
    from smlp_export.export.pipeline import ExportError, export_model

    out = tmp_path / "out"

    def other_export_publishes(stage):
        if stage == "publish":
            out.mkdir()
            (out / "model.onnx").write_text("the other export's")

    with pytest.raises(ExportError, match="another export published it"):
        export_model(micro_model(), out, validate=False, progress=other_export_publishes)
    assert [p.name for p in out.iterdir()] == ["model.onnx"]
    assert (out / "model.onnx").read_text() == "the other export's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir, no .old left


def test_checkpoint_killed_mid_save_is_cleaned_by_the_next_save(tmp_path):
    """SIGKILL inside a save leaves .C.tmp-HOST-PID-*; the next save to C removes it, but never
    the temp dir of a writer that is still alive."""
    target = tmp_path / "c"
    code = textwrap.dedent(f"""
        import sys, time
        from smlp_export.checkpoint import atomic_dir
        with atomic_dir({str(target)!r}) as tmp:
            (tmp / "half").write_text("x")
            print(tmp, flush=True)
            time.sleep(60)
    """)
    killed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    alive = subprocess.Popen([sys.executable, "-c", code.replace("(tmp / \"half\")", "(tmp / \"live\")")],
                             stdout=subprocess.PIPE, text=True)
    try:
        killed_tmp = Path(killed.stdout.readline().strip())
        alive_tmp = Path(alive.stdout.readline().strip())
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        assert killed_tmp.is_dir() and killed_tmp.name.startswith(".c.tmp-")
        save_checkpoint(micro_model(), target)
        assert not killed_tmp.exists()
        assert alive_tmp.is_dir()  # its writer is alive: left alone
    finally:
        alive.kill()
        alive.wait()
    assert load_checkpoint(target) is not None


def test_force_over_a_symlink_leaves_nothing_behind(tmp_path):
    real = save_checkpoint(micro_model(seed=1), tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    save_checkpoint(micro_model(seed=2), link, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .link.old-PID
    assert not link.is_symlink() and (link / "model.safetensors").is_file()
    assert load_checkpoint(real) is not None  # what the link pointed to is never deleted


def test_stale_leftovers_only_of_dead_writers_on_this_host(tmp_path):
    h, gone = fsutil.host_tag(), dead_pid()
    names = {f".OUT.tmp-{h}-{gone}-abc": True, f".OUT.old-{h}-{gone}": True, f".OUT.old-{gone}": True,
             f".OUT.tmp-{h}-{os.getppid()}-abc": False,  # alive
             f".OUT.tmp-00000000-{gone}-abc": h == "00000000",  # another host's PID: unknown here
             ".OUT.tmp-12345678": False,  # no PID in the name
             f".OUTX.tmp-{h}-{gone}-abc": False}  # another target
    for n in names:
        (tmp_path / n).mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep").write_text("x")
    link = f".OUT.old-{h}-{dead_pid()}"  # an interrupted --force over a symlinked OUT
    (tmp_path / link).symlink_to(tmp_path / "elsewhere")
    names[link] = True
    removed = {p.name for p in fsutil.clean_stale(tmp_path / "OUT")}
    assert removed == {n for n, stale in names.items() if stale}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["elsewhere"] + [n for n, s in names.items() if not s])
    assert (tmp_path / "elsewhere" / "keep").is_file()  # a link is removed, never followed


def test_checkpoint_and_report_modes_follow_the_umask(tmp_path, umask022):
    from smlp_export.bench.report import atomic_write
    from smlp_export.validate.report import ParityReport

    d = save_checkpoint(micro_model(), tmp_path / "c")
    assert mode(d) == 0o755
    assert {p.name: mode(p) for p in d.iterdir()} == {p.name: 0o644 for p in d.iterdir()}
    # parity.json through the real write path (its content does not matter here)
    ParityReport.write(types.SimpleNamespace(to_json=lambda: "{}"), tmp_path)
    assert mode(tmp_path / "parity.json") == 0o644
    atomic_write(tmp_path / "bench.json", lambda p: Path(p).write_text("{}"))
    assert mode(tmp_path / "bench.json") == 0o644
    os.umask(0o077)  # and a stricter umask is respected, not widened
    d2 = save_checkpoint(micro_model(), tmp_path / "c2")
    assert mode(d2) == 0o700 and mode(d2 / "config.json") == 0o600


# ---- one export shared by the export-level tests below ---------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An export with decode.onnx, made with --force over a symlink, next to a killed export's
    leftover; the checkpoint it came from sits beside it."""
    from smlp_export.export.pipeline import export_model

    old = os.umask(0o022)
    try:
        tmp = tmp_path_factory.mktemp("exported")
        ckpt = save_checkpoint(micro_model(), tmp / "ckpt")
        (tmp / "previous").mkdir()
        (tmp / "previous" / "keep").write_text("x")
        (tmp / "out").symlink_to(tmp / "previous")
        stale = tmp / f".out.tmp-{fsutil.host_tag()}-{dead_pid()}-zz"
        stale.mkdir()
        export_model(str(ckpt), tmp / "out", validate=False, decode=True, force=True)
    finally:
        os.umask(old)
    return tmp


def test_export_cleans_up_and_uses_ordinary_modes(exported):
    out = exported / "out"
    assert sorted(p.name for p in exported.iterdir()) == ["ckpt", "out", "previous"]
    assert not out.is_symlink() and (exported / "previous" / "keep").is_file()
    assert mode(out) == 0o755
    assert {p.name: mode(p) for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}
    assert (out / "decode.onnx").is_file()


def test_generate_torch_backend_on_an_export_runs_its_checkpoint(exported, capsys):
    out = exported / "out"
    code, text, err = run_cli(capsys, "generate", out, "--backend", "torch", "--prompt", "def ",
                              "--max-new-tokens", "3", "--json")
    assert code == 0, err
    res = json.loads(text)
    assert f"running its checkpoint {(exported / 'ckpt').resolve()}" in err
    from smlp_export.decode.runtime import TorchGenerator  # oracle: the checkpoint itself

    want = TorchGenerator(load_checkpoint(exported / "ckpt")).generate(list(b"def "), 3).tokens[0]
    assert res["tokens"] == want


def test_generate_torch_backend_on_an_export_whose_checkpoint_changed(exported, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(exported / "out", out)
    (tmp_path / "ckpt").symlink_to(exported / "ckpt")  # the manifest names it relative to the export
    man = json.loads((out / "manifest.json").read_text())
    man["checkpoint"]["weights_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(man))
    code, text, err = run_cli(capsys, "generate", out, "--backend", "torch", "--prompt", "def ", "--max-new-tokens", "2")
    assert code == 1 and "weights have changed" in one_error_line(err) and text == ""
    man["checkpoint"]["path"] = None
    (out / "manifest.json").write_text(json.dumps(man))
    code, text, err = run_cli(capsys, "generate", out, "--backend", "torch", "--prompt", "def ", "--max-new-tokens", "2")
    assert code == 1 and "--backend ort" in one_error_line(err) and "metadata.json" not in err


def test_export_given_where_a_checkpoint_is_needed(exported, capsys, tmp_path):
    # (`smlp inspect OUT` describes an export: issue 12; `smlp export` needs the checkpoint)
    code, _, err = run_cli(capsys, "export", exported / "out", "-o", tmp_path / "x", "--no-validate")
    line = one_error_line(err)
    assert code == 1 and "is an export directory, not a checkpoint" in line and "metadata.json" not in line
    assert str((exported / "ckpt").resolve()) in line and not (tmp_path / "x").exists()


# ---- deploy -------------------------------------------------------------------------------------------
def test_deploy_without_parity_warns_and_copies_with_ordinary_modes(exported, tmp_path, capsys, umask022):
    import shutil

    src = tmp_path / "export"
    shutil.copytree(exported / "out", src)
    os.chmod(src / "model.onnx", 0o600)  # an export written by an older version
    code, _, err = run_cli(capsys, "deploy", src, "-o", tmp_path / "repo", "--backend", "python")
    assert code == 0
    assert "warning:" in err and "no parity.json" in err
    served = tmp_path / "repo" / "smlp" / "1" / "model.onnx"
    assert mode(served) == 0o644 and mode(tmp_path / "repo") == 0o755
    # decode.onnx's scalar `position` travels as [1]: Triton has no scalars for non-batching models
    from smlp_export.deploy.model_config import parse_config

    cfg = parse_config((tmp_path / "repo" / "smlp_decode" / "config.pbtxt").read_text())
    assert [list(t.dims) for t in cfg.input if t.name == "position"] == [[1]]


def test_deploy_onnxruntime_backend_serves_decode_as_a_sequence_model(exported, tmp_path, capsys):
    """decode_seq.onnx becomes smlp_sequence (Triton's sequence batcher, implicit state); an older
    export without it still gets the warning that decode.onnx cannot be served by this backend."""
    import shutil

    code, _, err = run_cli(capsys, "deploy", exported / "out", "-o", tmp_path / "repo")
    assert code == 0 and "decode.onnx not deployed" not in err
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["README.md", "smlp", "smlp_deploy.json", "smlp_sequence"]
    old = tmp_path / "old"
    shutil.copytree(exported / "out", old)
    (old / "decode_seq.onnx").unlink()
    man = json.loads((old / "manifest.json").read_text())
    del man["decode"]["sequence"]
    man["files"] = [f for f in man["files"] if f["name"] != "decode_seq.onnx"]
    (old / "manifest.json").write_text(json.dumps(man))
    code, _, err = run_cli(capsys, "deploy", old, "-o", tmp_path / "repo2")
    assert code == 0 and "decode.onnx not deployed" in err
    assert sorted(p.name for p in (tmp_path / "repo2").iterdir()) == ["README.md", "smlp", "smlp_deploy.json"]


@pytest.mark.serving
def test_deploy_check_without_an_activated_virtualenv(exported, tmp_path):
    """`.venv/bin/smlp deploy --check` with a PATH that does not hold the virtualenv: the served
    python model must still import this environment's onnxruntime (and serve decode.onnx too)."""
    pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton) for a local tritonserver")
    smlp = Path(sys.executable).parent / "smlp"
    if not smlp.is_file():
        pytest.skip(f"no smlp entry point next to {sys.executable}")
    env = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([str(smlp), "deploy", str(exported / "out"), "-o", str(tmp_path / "repo"),
                        "--backend", "python", "--check"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "check passed" in r.stdout


def test_resume_without_a_trainer_state_is_refused(trained, tmp_path, capsys):
    """--resume on a folder with nothing to resume never trains from scratch silently."""
    _, corpus = trained
    for out in (tmp_path / "missing", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        code, _, err = run_cli(capsys, "train", "--preset", "micro", "--corpus", corpus, "--steps", "1",
                               "--batch-size", "2", "--threads", "1", "--resume", "-o", out)
        assert code == 1 and "has no trainer_state.pt to continue from" in one_error_line(err), err
        assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("args, words", [
    (["generate", "--temperature", "x"], "Invalid value for '--temperature': 'x' is not a valid float."),
    (["deploy"], "Missing argument 'OUT'."),
    (["nosuch"], "No such command 'nosuch'."),
])
def test_usage_errors_are_one_line(capsys, args, words):
    """click's own usage errors (bad option values, missing arguments) are one line too, exit 2."""
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err
