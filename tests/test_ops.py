"""Custom MoE ops: the sparse references against naive loops, and tracing with dynamic shapes."""
from __future__ import annotations

import pytest
import torch

from smlp_export import ops

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _moe_inputs(N, d=8, f=12, E=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(N, d), r(N, E), r(E, f, d), r(E, f), r(E, d, f), r(E, d)


@pytest.mark.parametrize("N", [1, 2, 33, 127])
@pytest.mark.parametrize("routing,k", [("base", 1), ("topk", 1), ("topk", 2)])
@pytest.mark.parametrize("act", ["gelu_tanh", "gelu", "relu", "silu"])
def test_token_moe_matches_naive(N, routing, k, act):
    h, lg, w1, b1, w2, b2 = _moe_inputs(N)
    got = torch.ops.smlp.token_moe(h, lg, w1, b1, w2, b2, routing, k, act)
    torch.testing.assert_close(got, ops.token_moe_naive(h, lg, w1, b1, w2, b2, routing, k, act), **TOL[torch.float32])


@pytest.mark.parametrize("routing,k", [("base", 1), ("topk", 2)])
def test_token_moe_all_to_one_expert_and_empty_experts(routing, k):
    h, lg, w1, b1, w2, b2 = _moe_inputs(29, E=6)
    lg[:, 4] += 100.0  # every token's first choice is expert 4
    if k == 2:
        lg[:, 1] += 50.0  # ... and its second is expert 1; experts 0, 2, 3, 5 get nothing
    got = torch.ops.smlp.token_moe(h, lg, w1, b1, w2, b2, routing, k, "gelu_tanh")
    torch.testing.assert_close(got, ops.token_moe_naive(h, lg, w1, b1, w2, b2, routing, k, "gelu_tanh"))
    # Empty experts really are skipped: poisoning their weights changes nothing.
    w1p = w1.clone()
    w1p[[0, 2, 3, 5]] = float("nan")
    torch.testing.assert_close(torch.ops.smlp.token_moe(h, lg, w1p, b1, w2, b2, routing, k, "gelu_tanh"), got)


def test_token_moe_gates():
    h, lg, w1, b1, w2, b2 = _moe_inputs(5)
    ids, g = ops.route_tokens(lg, "base", 1)
    torch.testing.assert_close(g[:, 0], torch.sigmoid(lg.max(-1).values))
    ids, g = ops.route_tokens(lg, "topk", 2)
    torch.testing.assert_close(g.sum(-1), torch.ones(5))
    assert (ids[:, 0] == lg.argmax(-1)).all()


def test_token_moe_float64_exact():
    args = _moe_inputs(17, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.smlp.token_moe(*args, "topk", 2, "gelu"),
                               ops.token_moe_naive(*args, "topk", 2, "gelu"), **TOL[torch.float64])


@pytest.mark.parametrize("B,T,n,E,c", [(1, 1, 5, 4, 8), (2, 5, 6, 4, 8), (3, 7, 7, 2, 6), (2, 4, 9, 1, 3)])
def test_spatial_moe_matches_naive(B, T, n, E, c):
    g = torch.Generator().manual_seed(T)
    z, W, b = torch.randn(B, T, c, generator=g), torch.randn(E, n, n, generator=g), torch.randn(E, n, generator=g)
    torch.testing.assert_close(torch.ops.smlp.spatial_moe(z, W, b), ops.spatial_moe_naive(z, W, b))


@pytest.mark.parametrize("B,T,p", [(2, 5, 3), (3, 2, 4), (1, 9, 2)])  # T < p zero-pads the router input
def test_spatial_moe_partial_matches_naive(B, T, p):
    g = torch.Generator().manual_seed(p)
    E, n, c = 3, 9, 5
    z, W, b = torch.randn(B, T, c, generator=g), torch.randn(E, n, n, generator=g), torch.randn(E, n, generator=g)
    Wr = torch.randn(p, E, generator=g)
    e, gate, probs = ops.route_channels(z, Wr)
    torch.testing.assert_close(torch.ops.smlp.spatial_moe_partial(z, W, b, Wr), ops.spatial_moe_naive(z, W, b, e, gate))
    # all channels to one expert (the others empty)
    Wr2 = torch.zeros(p, E)
    Wr2[:, 1] = 0  # equal logits: argmax picks expert 0 for all
    e2, g2, _ = ops.route_channels(z, Wr2)
    assert (e2 == 0).all()
    torch.testing.assert_close(torch.ops.smlp.spatial_moe_partial(z, W, b, Wr2), ops.spatial_moe_naive(z, W, b, e2, g2))


def test_spatial_ignores_upper_triangle():
    z, W, b = torch.randn(2, 6, 8), torch.randn(4, 6, 6), torch.randn(4, 6)
    W2 = W + torch.triu(torch.full_like(W, 1e3), diagonal=1)
    torch.testing.assert_close(torch.ops.smlp.spatial_moe(z, W, b), torch.ops.smlp.spatial_moe(z, W2, b))


def test_ops_trace_with_dynamic_shapes():
    """torch.export keeps each op as one node and the token / batch / sequence dims symbolic."""
    from torch.export import Dim, export

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.ParameterList(_moe_inputs(1)[2:])
            self.W, self.b = torch.nn.Parameter(torch.randn(4, 16, 16)), torch.nn.Parameter(torch.randn(4, 16))

        def forward(self, h, lg, z):
            y = torch.ops.smlp.token_moe(h, lg, *self.w, "topk", 2, "gelu_tanh")
            return y, torch.ops.smlp.spatial_moe(z, self.W, self.b)

    N, B, T = Dim("N", min=1, max=4096), Dim("B", min=1, max=64), Dim("T", min=1, max=16)
    h, lg = _moe_inputs(7)[:2]
    ep = export(M(), (h, lg, torch.randn(2, 5, 8)), dynamic_shapes=({0: N}, {0: N}, {0: B, 1: T}))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.smlp.token_moe.default in targets and torch.ops.smlp.spatial_moe.default in targets
    h2, lg2 = _moe_inputs(33, seed=5)[:2]
    z2 = torch.randn(3, 11, 8)
    m = M()
    ep = export(m, (h, lg, torch.randn(2, 5, 8)), dynamic_shapes=({0: N}, {0: N}, {0: B, 1: T}))
    for a, b in zip(ep.module()(h2, lg2, z2), m(h2, lg2, z2)):
        torch.testing.assert_close(a, b)
