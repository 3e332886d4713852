"""The streamed float32 reference (validate/streamed.py) equals the loaded model exactly and holds
no weights between calls; RowCache answers replayed rows without another pass (issue 21)."""
from __future__ import annotations

import numpy as np
import torch

from smlp_export import load_checkpoint, save_checkpoint
from smlp_export.runners.torch_runner import TorchRunner
from smlp_export.validate.streamed import RowCache, streamed_reference

from .conftest import micro_model


def test_streamed_reference_equals_the_loaded_model_and_holds_nothing(tmp_path) -> None:
    d = tmp_path / "ck"
    save_checkpoint(micro_model(seed=1, spatial_routing="partial"), d, dtype=torch.float16)
    ids = np.random.default_rng(0).integers(0, 257, size=(3, 21))
    want = TorchRunner(load_checkpoint(d))
    want.load()
    model = streamed_reference(d)
    got = TorchRunner(model)
    got.load()
    a, b = want.run(ids), got.run(ids)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(p.is_meta for p in model.parameters())  # nothing stays after the call
    assert model.checkpoint_info["weights_sha256"] == load_checkpoint(d).checkpoint_info["weights_sha256"]


class _Counting:
    def __init__(self, runner) -> None:
        self.runner, self.calls = runner, 0

    def run(self, ids):
        self.calls += 1
        return self.runner.run(ids)


def test_row_cache_replays_rows_of_an_earlier_batch() -> None:
    ref = TorchRunner(micro_model(seed=2))
    ref.load()
    inner = _Counting(ref)
    cache = RowCache(inner)
    ids = np.random.default_rng(1).integers(0, 257, size=(6, 9))
    full = cache.run(ids)
    picked = cache.run(ids[[4, 1]])
    assert inner.calls == 1  # answered from the scan
    for k in full:
        np.testing.assert_allclose(picked[k], ref.run(ids[[4, 1]])[k], rtol=1e-5, atol=1e-6)
    cache.run(np.concatenate([ids[:1], ids[:1] + 1]))  # one row never seen: a real pass
    assert inner.calls == 2


def test_token_experts_stay_half_during_the_call(tmp_path) -> None:
    """A half checkpoint's tMoE weights are not widened as a whole (E x 2 x f x d float32 at once):
    they stay in the file's dtype and ops.grouped_expert_ffn widens one expert at a time."""
    d = tmp_path / "ck"
    save_checkpoint(micro_model(seed=3), d, dtype=torch.float16)
    model = streamed_reference(d)
    seen: dict[str, torch.dtype] = {}
    for name, mod in model.named_modules():
        if name.endswith("tmoe"):
            mod.register_forward_pre_hook(lambda m, a, name=name: seen.update({name: None if m.w1.is_meta else m.w1.dtype}))
        elif name.endswith("norm"):
            mod.register_forward_pre_hook(lambda m, a, name=name: seen.update({name: m.weight.dtype}))
    runner = TorchRunner(model)
    runner.load()
    runner.run(np.random.default_rng(2).integers(0, 257, size=(2, 9)))
    tm = {k: v for k, v in seen.items() if k.endswith("tmoe")}
    assert tm and set(tm.values()) == {torch.float16}
    assert {v for k, v in seen.items() if k.endswith("norm")} == {torch.float32}
