"""smlp_export.shapes: the state dict by arithmetic equals the model's own, and config/weights
disagreements or implausible configs are refused before any module is built (issue 21)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from smlp_export import SMLPForCausalLM, load_checkpoint, preset, save_checkpoint
from smlp_export.errors import CheckpointError
from smlp_export.shapes import state_shapes

from .conftest import ROUTING_MODES


def _module_state(cfg) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in SMLPForCausalLM(cfg).state_dict().items()}


@pytest.mark.parametrize("overrides", [*ROUTING_MODES.values(), {"lm_head_bias": True}, {"n_sparse": 0},
                                       {"n_sparse": 3, "n_layers": 3}],
                         ids=[*ROUTING_MODES, "lm_head_bias", "dense-only", "all-sparse"])
def test_state_shapes_equal_the_module_in_names_order_and_shapes(overrides) -> None:
    cfg = preset("micro", **overrides)
    assert list(state_shapes(cfg).items()) == list(_module_state(cfg).items())


@pytest.mark.parametrize("name", ["tiny", "3.5b", "9.4b"])
def test_state_shapes_equal_the_module_for_presets(name) -> None:
    cfg = preset(name)
    assert state_shapes(cfg) == _module_state(cfg)


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "ck"
    save_checkpoint(SMLPForCausalLM(preset("micro")), d)
    return d


def _no_module(monkeypatch) -> None:
    def boom(self, *a, **k):
        raise AssertionError("a module was built before the header was checked")

    monkeypatch.setattr(SMLPForCausalLM, "__init__", boom)


def test_config_disagreeing_with_the_weights_is_refused_before_a_module_exists(ckpt, monkeypatch) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["d_expert"] = 96
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _no_module(monkeypatch)
    from smlp_export.export.weights import open_checkpoint

    for load in (load_checkpoint, open_checkpoint):
        with pytest.raises(CheckpointError, match=r"tensor blocks\.1\.tmoe\.b1 has shape \[4, 64\] but config"):
            load(ckpt)


@pytest.mark.parametrize("command", [["inspect", "{ck}"], ["export", "{ck}", "-o", "{out}", "--no-validate"]])
def test_implausible_config_is_refused_at_once(ckpt, tmp_path, command, monkeypatch, capsys) -> None:
    """n_layers = 10**6 on a small width: one line, no module, well under a second."""
    from smlp_cli.main import main

    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["n_layers"] = 1_000_000
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _no_module(monkeypatch)
    args = [a.format(ck=ckpt, out=tmp_path / "out") for a in command]
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err
    assert "n_layers = 1000000 is beyond any sMLP" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
