"""Trainer: learns, is deterministic for a seed, resumes exactly, fine-tunes from a checkpoint."""
from __future__ import annotations

import pytest
import torch

from smlp_export import load_checkpoint, preset
from smlp_export import data as data_mod
from smlp_export.train import TrainArgs, train

ARGS = dict(steps=6, batch_size=4, eval_every=3, eval_windows=4, save_every=3, warmup=2, seed=3, final_eval_windows=4)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weights(d):
    return load_checkpoint(d).state_dict()


def test_deterministic_and_learns(tmp_path):
    cfg = preset("micro")
    m1 = train(cfg, tmp_path / "a", TrainArgs(**ARGS), progress=False, log=lambda *_: None)
    train(cfg, tmp_path / "b", TrainArgs(**ARGS), progress=False, log=lambda *_: None)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    h = m1["history"]
    assert h[-1]["heldout_loss"] < h[0]["heldout_loss"] or h[-1]["train_loss"] < 5.5
    assert m1["heldout"]["bits_per_byte"] > 0 and m1["unigram_bits_per_byte"] > 4


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = preset("micro")
    train(cfg, tmp_path / "full", TrainArgs(**ARGS), progress=False, log=lambda *_: None)
    real = data_mod.random_batch
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # dies during step 5, after the step-3 state was saved
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(data_mod, "random_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", TrainArgs(**ARGS), progress=False, log=lambda *_: None)
    monkeypatch.setattr(data_mod, "random_batch", real)
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # no complete-looking checkpoint
    train(cfg, tmp_path / "cut", TrainArgs(**ARGS), resume=True, progress=False, log=lambda *_: None)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_records_its_base(tmp_path):
    cfg = preset("micro")
    train(cfg, tmp_path / "base", TrainArgs(**ARGS), progress=False, log=lambda *_: None)
    meta = train(None, tmp_path / "ft", TrainArgs(**{**ARGS, "steps": 3}), init_from=tmp_path / "base",
                 progress=False, log=lambda *_: None)
    assert meta["init_from"]["weights_sha256"] == load_checkpoint(tmp_path / "base").checkpoint_info["weights_sha256"]
    assert meta["total_steps_including_init"] == 9
