"""flops_per_token against torch's own FLOP counter on the model's matrix products.

Oracle: ``torch.utils.flop_counter.FlopCounterMode`` over a forward of the *training-mode* model
(plain-torch references, so every mm/bmm/addmm is visible to the counter; the inference custom
ops are opaque to it). The training path computes the spatial products densely (tril-masked full
T x T), so the oracle matches ``causal=False``; ``causal=True`` is then checked as the full count
minus the masked upper triangle, computed here from the shapes.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from smlp_export import SMLPForCausalLM, preset
from smlp_export.flops import flops_forward, flops_per_token

CASES = {
    "micro-base": {},
    "topk2-partial": {"token_routing": "topk", "top_k": 2, "spatial_routing": "partial"},
    "wide-experts": {"d_expert": 96, "n_token_experts": 6, "n_layers": 5, "n_sparse": 1},
}


def counted_flops(model: SMLPForCausalLM, B: int, T: int) -> int:
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    model.train()  # reference ops: every GEMM visible to the counter (balanced routing, same k)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids)
    return fc.get_total_flops()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("B, T", [(1, 1), (2, 7), (3, 32)])
def test_full_count_matches_torch_flop_counter(name: str, B: int, T: int) -> None:
    torch.manual_seed(0)
    model = SMLPForCausalLM(preset("micro", **CASES[name]))
    want = counted_flops(model, B, T)
    assert flops_forward(model.config, B, T, causal=False) == pytest.approx(want, rel=1e-12)


def test_causal_count_drops_exactly_the_masked_triangle() -> None:
    cfg = preset("micro")
    c, n_spatial_products = cfg.spatial_channels, cfg.n_layers  # one per dense block and per sMoE
    for T in (1, 2, 17, 32):
        masked_macs_per_seq = c * T * (T - 1) / 2  # entries above the diagonal, every channel
        diff = (flops_per_token(cfg, T, causal=False) - flops_per_token(cfg, T)) * T
        assert diff == pytest.approx(2 * n_spatial_products * masked_macs_per_seq)


def test_out_of_range_length_is_refused() -> None:
    cfg = preset("micro")
    with pytest.raises(ValueError, match="T must be in"):
        flops_per_token(cfg, cfg.max_seq_len + 1)
