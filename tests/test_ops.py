"""Custom MoE ops: the sparse references against naive loops, and tracing with dynamic shapes."""
from __future__ import annotations

import pytest
import torch

from smlp_export import ops

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}

_ACTS = {"gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 2 ** 0.5)),
         "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))),
         "relu": lambda x: torch.clamp(x, min=0), "silu": lambda x: x / (1 + torch.exp(-x))}


def token_moe_oracle(h, lg, w1, b1, w2, b2, routing, k, act):
    """Naive per-token loop that routes on its own (never calls the op's route_tokens):
    base = the single largest logit, gate sigmoid(logit); topk = the k largest (first index on
    equal values), gates = softmax over those k logits."""
    out = torch.zeros_like(h)
    for i in range(h.shape[0]):
        row = [float(v) for v in lg[i]]
        picked: list[int] = []
        for _ in range(k):  # selection by repeated scan: largest remaining logit, lowest index on ties
            best = None
            for e, v in enumerate(row):
                if e not in picked and (best is None or v > row[best]):
                    best = e
            picked.append(best)
        if routing == "base":
            gates = [1 / (1 + torch.exp(-lg[i, picked[0]]))]
        else:
            z = torch.stack([lg[i, e] for e in picked])
            ez = torch.exp(z - z.max())
            gates = list(ez / ez.sum())
        for e, g in zip(picked, gates):
            out[i] += g * (w2[e] @ _ACTS[act](w1[e] @ h[i] + b1[e]) + b2[e])
    return out


def spatial_moe_oracle(z2, weight, bias, router=None):
    """Naive loop over (sequence, channel, position). Deterministic: channel ch -> expert ch // (c/E),
    gate 1. Partial (router [p, E]): expert = argmax_e sum_{u < min(p, T)} z2[b, u, ch] * router[u, e]
    (positions >= T count as zero), gate = its softmax probability; routed here, not by route_channels."""
    B, T, c = z2.shape
    E = weight.shape[0]
    out = torch.zeros_like(z2)
    for b in range(B):
        for ch in range(c):
            if router is None:
                e, g = ch // (c // E), 1.0
            else:
                p = router.shape[0]
                logits = [sum(float(z2[b, u, ch]) * float(router[u, j]) for u in range(min(p, T))) for j in range(E)]
                e = max(range(E), key=lambda j: (logits[j], -j))
                m = max(logits)
                g = torch.exp(torch.tensor(logits[e] - m, dtype=torch.float64)) / sum(
                    torch.exp(torch.tensor(v - m, dtype=torch.float64)) for v in logits)
                g = float(g)
            for t in range(T):
                out[b, t, ch] = g * (sum(weight[e, t, u] * z2[b, u, ch] for u in range(t + 1)) + bias[e, t])
    return out


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
    torch.testing.assert_close(got, token_moe_oracle(h, lg, w1, b1, w2, b2, routing, k, act), **TOL[torch.float32])


@pytest.mark.parametrize("routing,k", [("base", 1), ("topk", 2)])
def test_token_moe_all_to_one_expert_and_empty_experts(routing, k):
    h, lg, w1, b1, w2, b2 = _moe_inputs(29, E=6)
    lg[:, 4] += 100.0  # every token's first choice is expert 4
    if k == 2:
        lg[:, 1] += 50.0  # ... and its second is expert 1; experts 0, 2, 3, 5 get nothing
    got = torch.ops.smlp.token_moe(h, lg, w1, b1, w2, b2, routing, k, "gelu_tanh")
    torch.testing.assert_close(got, token_moe_oracle(h, lg, w1, b1, w2, b2, routing, k, "gelu_tanh"))
    # Empty experts really are skipped: poisoning their weights changes nothing.
    w1p = w1.clone()
    w1p[[0, 2, 3, 5]] = float("nan")
    torch.testing.assert_close(torch.ops.smlp.token_moe(h, lg, w1p, b1, w2, b2, routing, k, "gelu_tanh"), got)


def test_token_moe_gates():
    """Routing by hand on a constructed case: expected experts and gates written out."""
    lg = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, -2.0, 3.5, 0.5]])
    ids, g = ops.route_tokens(lg, "base", 1)
    assert ids[:, 0].tolist() == [1, 2]
    torch.testing.assert_close(g[:, 0], torch.tensor([1 / (1 + torch.e ** -2.0), 1 / (1 + torch.e ** -3.5)]))
    ids, g = ops.route_tokens(lg, "topk", 2)
    assert ids.tolist() == [[1, 2], [2, 0]]
    e1 = torch.e ** -1.0
    e2 = torch.e ** -0.5
    torch.testing.assert_close(g, torch.tensor([[1 / (1 + e1), e1 / (1 + e1)], [1 / (1 + e2), e2 / (1 + e2)]]))


def test_token_moe_float64_exact():
    args = _moe_inputs(17, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.smlp.token_moe(*args, "topk", 2, "gelu"),
                               token_moe_oracle(*args, "topk", 2, "gelu"), **TOL[torch.float64])


@pytest.mark.parametrize("B,T,n,E,c", [(1, 1, 5, 4, 8), (2, 5, 6, 4, 8), (3, 7, 7, 2, 6), (2, 4, 9, 1, 3)])
def test_spatial_moe_matches_naive(B, T, n, E, c):
    g = torch.Generator().manual_seed(T)
    z, W, b = torch.randn(B, T, c, generator=g), torch.randn(E, n, n, generator=g), torch.randn(E, n, generator=g)
    torch.testing.assert_close(torch.ops.smlp.spatial_moe(z, W, b), spatial_moe_oracle(z, W, b))


@pytest.mark.parametrize("B,T,p", [(2, 5, 3), (3, 2, 4), (1, 9, 2)])  # T < p zero-pads the router input
def test_spatial_moe_partial_matches_naive(B, T, p):
    g = torch.Generator().manual_seed(p)
    E, n, c = 3, 9, 5
    z, W, b = torch.randn(B, T, c, generator=g), torch.randn(E, n, n, generator=g), torch.randn(E, n, generator=g)
    Wr = torch.randn(p, E, generator=g)
    torch.testing.assert_close(torch.ops.smlp.spatial_moe_partial(z, W, b, Wr), spatial_moe_oracle(z, W, b, Wr))
    # All channels to one expert (the others empty): z2 > 0 everywhere and a router whose expert-1
    # column is large and positive makes expert 1 every channel's clear choice.
    zp = z.abs() + 0.1
    Wr2 = torch.zeros(p, E)
    Wr2[:, 1] = 5.0
    e2, g2, _ = ops.route_channels(zp, Wr2)
    assert (e2 == 1).all() and (g2 > 1 / E).all()
    torch.testing.assert_close(torch.ops.smlp.spatial_moe_partial(zp, W, b, Wr2), spatial_moe_oracle(zp, W, b, Wr2))
    # Equal logits (an all-zero router): every channel goes to the first expert, gate 1/E.
    e3, g3, _ = ops.route_channels(z, torch.zeros(p, E))
    assert (e3 == 0).all() and torch.allclose(g3, torch.full_like(g3, 1 / E))
    torch.testing.assert_close(torch.ops.smlp.spatial_moe_partial(z, W, b, torch.zeros(p, E)),
                               spatial_moe_oracle(z, W, b, torch.zeros(p, E)))


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
