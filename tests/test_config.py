from __future__ import annotations

import pytest

from smlp_export import ConfigError, SMLPConfig, preset


def test_json_round_trip():
    cfg = preset("tiny", token_routing="topk", top_k=2, spatial_routing="partial")
    assert SMLPConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("kw, message", [
    ({"d_ffn": 512, "n_spatial_experts": 3}, "not divisible by n_spatial_experts = 3"),
    ({"n_layers": 2, "n_sparse": 3}, r"n_sparse \(N2=3\) must be <= n_layers \(L=2\)"),
    ({"token_routing": "hash"}, "unknown token_routing 'hash'"),
    ({"spatial_routing": "random"}, "unknown spatial_routing 'random'"),
    ({"token_routing": "topk", "top_k": 3}, "top_k must be 1 or 2"),
    ({"token_routing": "base", "top_k": 2}, "greedy top-1: top_k must be 1"),
    ({"d_ffn": 33}, "d_ffn must be even"),
    ({"max_seq_len": 0}, "max_seq_len must be >= 1"),
    ({"expert_activation": "tanh"}, "unknown expert_activation"),
    ({"partial_fraction": 1.5}, r"partial_fraction must be in \(0, 1\)"),
    ({"d_model": "128"}, "d_model must be an integer"),
])
def test_validation_messages(kw, message):
    with pytest.raises(ConfigError, match=message):
        SMLPConfig(**kw)


def test_unknown_field_and_bad_json():
    with pytest.raises(ConfigError, match="unknown field"):
        SMLPConfig.from_dict({"d_model": 8, "heads": 4})
    with pytest.raises(ConfigError, match="not JSON"):
        SMLPConfig.from_json("{")


def test_partial_prefix_length():
    assert SMLPConfig(spatial_routing="partial", max_seq_len=128).prefix_len == 26
    assert SMLPConfig(max_seq_len=128).prefix_len == 0
