from __future__ import annotations

import pytest
import torch

from smlp_export import SMLPConfig, SMLPForCausalLM, preset

# Every routing mode the model supports, on the seconds-fast "micro" shape.
ROUTING_MODES = {
    "base-deterministic": {},
    "topk1": {"token_routing": "topk", "top_k": 1},
    "topk2": {"token_routing": "topk", "top_k": 2},
    "partial": {"spatial_routing": "partial"},
    "topk2-partial": {"token_routing": "topk", "top_k": 2, "spatial_routing": "partial"},
}


def micro_model(seed: int = 0, **overrides) -> SMLPForCausalLM:
    torch.manual_seed(seed)
    m = SMLPForCausalLM(preset("micro", **overrides)).eval()
    # Random init leaves routers near ties; scale them up so routing decisions are meaningful.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("centroids") or name.endswith("router"):
                p.mul_(50)
    return m


@pytest.fixture(params=sorted(ROUTING_MODES), ids=sorted(ROUTING_MODES))
def routed_model(request) -> SMLPForCausalLM:
    return micro_model(**ROUTING_MODES[request.param])


@pytest.fixture
def micro_cfg() -> SMLPConfig:
    return preset("micro")
