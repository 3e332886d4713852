"""Checkpoint round trip, atomic saves, and one clear error per kind of bad checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from smlp_export import CheckpointError, load_checkpoint, save_checkpoint
from smlp_export.checkpoint import METADATA_FILE, WEIGHTS_FILE, sha256_file

from .conftest import micro_model


@pytest.fixture
def ckpt(tmp_path):
    m = micro_model()
    return m, save_checkpoint(m, tmp_path / "ckpt")


def _rewrite_weights(d, state):
    """Replace the weights and keep metadata's sha256 in step, so only the intended defect remains."""
    save_file(state, str(d / WEIGHTS_FILE))
    meta = json.loads((d / METADATA_FILE).read_text())
    meta["weights_sha256"] = sha256_file(d / WEIGHTS_FILE)
    (d / METADATA_FILE).write_text(json.dumps(meta))


def test_round_trip_is_exact(ckpt):
    m, d = ckpt
    m2 = load_checkpoint(d)
    assert not m2.training
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    assert m2.config == m.config
    assert m2.tokenizer.decode(m2.tokenizer.encode("héllo")) == "héllo"
    assert m2.checkpoint_info["weights_sha256"] == sha256_file(d / WEIGHTS_FILE)


def test_fp16_checkpoint_loads(tmp_path):
    m = micro_model()
    d = save_checkpoint(m, tmp_path / "h", dtype=torch.float16)
    m2 = load_checkpoint(d)
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v.half().float())


def test_save_refuses_existing_and_is_atomic(tmp_path, monkeypatch):
    m = micro_model()
    d = save_checkpoint(m, tmp_path / "c")
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(m, d)
    import smlp_export.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(m, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temp directory left behind
    with pytest.raises(OSError):  # overwrite that fails keeps the old checkpoint intact
        ck.save_checkpoint(m, d, overwrite=True)
    monkeypatch.undo()
    assert load_checkpoint(d) is not None


@pytest.mark.parametrize("defect, message", [
    ("missing", r"missing tensor blocks\.0\.norm\.weight"),
    ("unexpected", r"unexpected tensor extra\.weight"),
    ("shape", r"tensor lm_head\.weight has shape \[257, 16\] but config\.json implies \[257, 32\]"),
    ("dtype", r"tensor embed\.weight has dtype torch\.int32"),
    ("nan", r"tensor blocks\.1\.tmoe\.w1 contains NaN or Inf"),
    ("inf", r"tensor norm_f\.bias contains NaN or Inf"),
])
def test_bad_tensors(ckpt, defect, message):
    _, d = ckpt
    state = load_file(str(d / WEIGHTS_FILE))
    if defect == "missing":
        del state["blocks.0.norm.weight"]
    elif defect == "unexpected":
        state["extra.weight"] = torch.zeros(2)
    elif defect == "shape":
        state["lm_head.weight"] = torch.zeros(257, 16)
    elif defect == "dtype":
        state["embed.weight"] = state["embed.weight"].to(torch.int32)
    elif defect == "nan":
        state["blocks.1.tmoe.w1"][0, 0, 0] = float("nan")
    elif defect == "inf":
        state["norm_f.bias"][3] = float("inf")
    _rewrite_weights(d, state)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(d)


def test_truncated_file(ckpt):
    _, d = ckpt
    w = d / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(d)


def test_corrupt_bytes_detected_by_checksum(ckpt):
    _, d = ckpt
    w = d / WEIGHTS_FILE
    raw = bytearray(w.read_bytes())
    raw[-5] ^= 0x01  # flip a bit inside tensor data: still a structurally valid file
    w.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(d)


def test_config_that_does_not_match_weights(ckpt):
    _, d = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_token_experts"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tmoe\.b1 has shape \[4, 64\] but config\.json implies \[8, 64\]"):
        load_checkpoint(d)


def test_invalid_config_field(ckpt):
    _, d = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg["token_routing"] = "hash"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown token_routing 'hash'"):
        load_checkpoint(d)


def test_unknown_format_version(ckpt):
    _, d = ckpt
    meta = json.loads((d / METADATA_FILE).read_text())
    meta["format_version"] = 99
    (d / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown checkpoint format_version 99"):
        load_checkpoint(d)


def test_missing_files_and_paths(tmp_path, ckpt):
    _, d = ckpt
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_checkpoint(d)


def test_pickle_refused_unless_opted_in(tmp_path):
    m = micro_model()
    p = tmp_path / "m.pt"
    torch.save({"config": m.config.to_dict(), "state_dict": m.state_dict()}, p)
    with pytest.raises(CheckpointError, match="pickled checkpoints are refused"):
        load_checkpoint(p)
    m2 = load_checkpoint(p, allow_pickle=True)
    x = torch.randint(0, 257, (1, 9))
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    # weights_only=True refuses arbitrary objects
    torch.save({"config": m.config.to_dict(), "state_dict": m.state_dict(), "evil": object()}, p)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(p, allow_pickle=True)


def test_cli_error_is_one_line_without_traceback(ckpt):
    _, d = ckpt
    (d / WEIGHTS_FILE).write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "smlp_cli.main", "inspect", str(d), "--no-heldout"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "corrupt or truncated" in lines[0]
