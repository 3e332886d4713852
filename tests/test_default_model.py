"""The embedded default checkpoint is small, genuinely trained and uses every expert."""
from __future__ import annotations

import pytest
import torch

from smlp_export import load_checkpoint
from smlp_export.checkpoint import WEIGHTS_FILE, default_checkpoint_dir
from smlp_export.train import evaluate

# Recorded bound: the shipped model measured ~1.6 bits/byte on held-out stdlib files (metadata.json);
# a unigram byte model scores 4.75. Anything above this bound means a broken or untrained model.
HELDOUT_BPB_BOUND = 1.8
MIN_EXPERT_SHARE = 0.01  # every token expert takes >= 1 % of held-out tokens under greedy routing


@pytest.fixture(scope="module")
def default():
    return load_checkpoint(None)


def test_shape_and_size(default):
    cfg = default.config
    assert 2_000_000 <= default.num_parameters() <= 6_000_000
    assert len(cfg.sparse_layer_ids()) >= 2 and cfg.n_token_experts >= 4 and cfg.n_spatial_experts >= 4
    assert cfg.max_seq_len >= 128
    assert (default_checkpoint_dir() / WEIGHTS_FILE).stat().st_size <= 16 * 2**20


def test_metadata_records_training(default):
    meta = default.checkpoint_info["metadata"]
    assert meta["kind"] == "trained" and meta["command"].startswith("smlp train")
    for key in ("steps", "wall_time_s", "train_args", "corpus", "heldout", "unigram_bits_per_byte"):
        assert key in meta
    assert meta["heldout"]["bits_per_byte"] < meta["unigram_bits_per_byte"] / 2


def test_heldout_bits_per_byte_below_bound_and_experts_used(default):
    torch.manual_seed(0)
    ev = evaluate(default, n_windows=32)
    assert ev["bits_per_byte"] < HELDOUT_BPB_BOUND, ev["bits_per_byte"]
    for layer, load in ev["expert_load"].items():
        assert min(load) >= MIN_EXPERT_SHARE, (layer, load)
