"""Checkpoint directories follow huggingface_hub's PyTorchModelHubMixin conventions, both ways, offline.

The other side is the real mixin (huggingface_hub, dev extra): a ``PyTorchModelHubMixin`` subclass of
the model, the way a Hub user would write one, loads our directories with its own ``from_pretrained``
and writes directories with its own ``save_pretrained`` that ours must load.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from smlp_export import CheckpointError, SMLPConfig, SMLPForCausalLM, load_checkpoint, save_checkpoint
from smlp_export.checkpoint import LEGACY_TOKENIZER_FILE, TOKENIZER_FILE

from .conftest import micro_model

hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub is a dev-extra dependency")


class HubSMLP(hub.PyTorchModelHubMixin, SMLPForCausalLM):
    """What a Hub user writes: the mixin first, so its save/from_pretrained are the ones used.
    The mixin hands config.json to ``__init__`` as a dict; the model accepts that."""


def logits(model, seed: int = 0) -> torch.Tensor:
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(ids)


def test_our_directory_loads_with_the_mixin(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = micro_model(seed=3)
    m.save_pretrained(tmp_path / "ckpt")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["config.json", "metadata.json", "model.safetensors", TOKENIZER_FILE]
    assert LEGACY_TOKENIZER_FILE not in names  # HF tools would read tokenizer.json as a `tokenizers` file
    loaded = HubSMLP.from_pretrained(tmp_path / "ckpt", strict=True)
    assert isinstance(loaded.config, SMLPConfig) and loaded.config == m.config
    assert torch.equal(logits(loaded), logits(m))
    # and ours reads it back (the validated loader: metadata, sha256, tokenizer)
    ours = SMLPForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(logits(ours), logits(m)) and ours.checkpoint_info["metadata"]["format_version"] == 1


def test_mixin_directory_loads_here(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = micro_model(seed=4)
    h = HubSMLP(src.config)
    h.load_state_dict(src.state_dict())
    h.save_pretrained(tmp_path / "hf")  # the mixin's own writer: config.json, model.safetensors, README.md
    assert not (tmp_path / "hf" / "metadata.json").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == src.config.to_dict()
    ours = SMLPForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(ours) is SMLPForCausalLM and not ours.training
    assert torch.equal(logits(ours), logits(src))
    assert ours.tokenizer.vocab_size == src.config.vocab_size
    assert ours.tokenizer.eos_token_id == src.config.eos_token_id
    # structural checks still apply to mixin directories: a tensor missing is one clear error
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor lm_head.weight"):
        SMLPForCausalLM.from_pretrained(tmp_path / "hf")


def test_default_model_loads_with_the_mixin() -> None:
    from smlp_export.checkpoint import default_checkpoint_dir

    d = default_checkpoint_dir()
    assert (d / TOKENIZER_FILE).is_file() and not (d / LEGACY_TOKENIZER_FILE).exists()
    assert torch.equal(logits(HubSMLP.from_pretrained(d, strict=True)), logits(load_checkpoint(None)))


def test_legacy_tokenizer_file_and_vocab_without_eos(tmp_path: Path) -> None:
    m = micro_model(seed=5)
    save_checkpoint(m, tmp_path / "old")
    # a checkpoint written before the rename: tokenizer.json only
    (tmp_path / "old" / TOKENIZER_FILE).rename(tmp_path / "old" / LEGACY_TOKENIZER_FILE)
    old = load_checkpoint(tmp_path / "old")
    assert old.tokenizer.eos_token_id == 256 and torch.equal(logits(old), logits(m))
    # no EOS: config and tokenizer both say so, and it survives a round trip
    m2 = SMLPForCausalLM(m.config.replace(vocab_size=256, eos_token_id=None))
    save_checkpoint(m2, tmp_path / "noeos")
    assert json.loads((tmp_path / "noeos" / TOKENIZER_FILE).read_text())["eos_token_id"] is None
    back = load_checkpoint(tmp_path / "noeos")
    assert back.tokenizer.eos_token_id is None and back.config.eos_token_id is None
    assert back.tokenizer.decode(back.tokenizer.encode("héllo")) == "héllo"


def test_from_pretrained_is_offline_and_refuses_clearly(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a local checkpoint directory .* offline"):
        SMLPForCausalLM.from_pretrained("someone/some-model")
    m = micro_model()
    m.save_pretrained(tmp_path / "c")
    with pytest.raises(CheckpointError, match="already exists"):
        m.save_pretrained(tmp_path / "c")
    m.save_pretrained(tmp_path / "c", overwrite=True)
    shutil.rmtree(tmp_path / "c")


def test_lm_head_bias_option_default_off() -> None:
    """Off by default: the default architecture's parameters are unchanged (no lm_head.bias)."""
    from smlp_export import preset

    assert SMLPConfig().lm_head_bias is False
    assert "lm_head.bias" not in SMLPForCausalLM(preset("micro")).state_dict()
    m = SMLPForCausalLM(preset("micro", lm_head_bias=True))
    assert m.state_dict()["lm_head.bias"].shape == (m.config.vocab_size,)
    with pytest.raises(Exception, match="lm_head_bias must be true or false"):
        SMLPConfig(lm_head_bias="yes")


def test_manifest_written_before_lm_head_bias_still_matches() -> None:
    """Exports made before the field existed record a config without it: still the same config."""
    from smlp_export import preset
    from smlp_export.validate.parity import _same_config

    cfg = preset("micro")
    old = {k: v for k, v in cfg.to_dict().items() if k != "lm_head_bias"}
    assert _same_config(cfg, old) and _same_config(cfg, cfg.to_dict())
    assert not _same_config(cfg, {**old, "lm_head_bias": True}) and not _same_config(cfg, {**old, "d_model": 8})
    assert not _same_config(cfg, {**old, "colour": 1})
