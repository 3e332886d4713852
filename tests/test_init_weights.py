"""Streamed ``smlp init`` (smlp_export.init_weights): the same bytes as building the model and
saving it, slice by slice, without building it (issue 21)."""
from __future__ import annotations

import pytest
import torch

from smlp_export import SMLPForCausalLM, load_checkpoint, preset, save_checkpoint
from smlp_export import checkpoint, init_weights, memory
from smlp_export.errors import CheckpointError
from smlp_export.fsutil import sha256_file

CASES = {
    "micro": ("micro", {}),
    "topk2-partial-bias": ("micro", {"token_routing": "topk", "top_k": 2, "spatial_routing": "partial",
                                     "lm_head_bias": True}),
    # d_model 24, vocab 101: embedding / lm_head of 2424 elements, not a multiple of 16
    "odd": ("micro", {"vocab_size": 101, "d_model": 24, "eos_token_id": 100}),
}


def _same_file(name: str, kw: dict, dtype, tmp_path) -> None:
    cfg = preset(name, **kw)
    torch.manual_seed(7)
    save_checkpoint(SMLPForCausalLM(cfg), tmp_path / "built", dtype=dtype)
    sha = init_weights.write_random_init(cfg, tmp_path / "streamed.safetensors", seed=7, dtype=dtype)
    assert sha == sha256_file(tmp_path / "built" / "model.safetensors")
    assert sha == sha256_file(tmp_path / "streamed.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_file_equals_the_built_model_saved(case, dtype, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(init_weights, "CHUNK", 48)  # many slices per tensor, as at paper scale
    _same_file(*CASES[case], dtype, tmp_path)


@pytest.mark.parametrize("chunk", [2416, 1 << 24], ids=["tail-of-8", "default"])
def test_short_normal_tail_and_default_chunk(chunk, tmp_path, monkeypatch) -> None:
    """2424 = 2416 + 8: the 8-element tail must be drawn with the slice before it."""
    monkeypatch.setattr(init_weights, "CHUNK", chunk)
    _same_file(*CASES["odd"], torch.float16, tmp_path)


def test_tiny_preset(tmp_path) -> None:
    _same_file("tiny", {}, torch.float16, tmp_path)


def test_init_checkpoint_loads_and_leaves_the_callers_generator_alone(tmp_path) -> None:
    cfg = preset("micro")
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    checkpoint.init_checkpoint(cfg, tmp_path / "ck", seed=3, dtype=torch.float16, metadata={"seed": 3})
    assert torch.equal(before, torch.random.get_rng_state())
    m = load_checkpoint(tmp_path / "ck")
    assert m.checkpoint_info["metadata"]["dtype"] == "float16"
    assert m.num_parameters() == memory.num_parameters(cfg)
    torch.manual_seed(3)
    ref = SMLPForCausalLM(cfg).state_dict()
    for k, v in m.state_dict().items():
        want = ref[k].half().float() if v.dtype == torch.float32 else ref[k].half()  # LayerNorms cast up
        assert torch.equal(v, want), k


def test_init_refuses_without_disk_room_and_writes_nothing(tmp_path, monkeypatch) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6, 1000))
    with pytest.raises(CheckpointError, match="the weights need .* GB of disk but only"):
        checkpoint.init_checkpoint(preset("micro"), tmp_path / "ck", seed=0, dtype=torch.float32)
    assert list(tmp_path.iterdir()) == []


def test_peak_is_a_slice_not_the_model() -> None:
    cfg = preset("9.4b")
    assert init_weights.peak_numel(cfg) <= init_weights.CHUNK + 15
    from smlp_export.memory import estimate

    assert estimate(cfg, "init") < 2 * 1024**3
