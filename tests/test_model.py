"""Model semantics: causality in every routing mode, length limits, batch independence, balance."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smlp_export import InputError
from smlp_export.model import balanced_assignment

from .conftest import ROUTING_MODES, micro_model


def test_causality_every_mode(routed_model):
    """Changing tokens at positions >= t never changes logits at positions < t, for every t
    (partial prediction: for every t >= p, the routing prefix). One batch row per t."""
    m = routed_model
    cfg = m.config
    T = cfg.max_seq_len
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
    ts = list(range(max(1, cfg.prefix_len), T))
    y = x.repeat(len(ts), 1)
    for row, t in enumerate(ts):
        y[row, t:] = (x[0, t:] + torch.randint(1, cfg.vocab_size, (T - t,), generator=g)) % cfg.vocab_size
    with torch.no_grad():
        base = m(x)[0]
        out = m(y)
    for row, t in enumerate(ts):
        torch.testing.assert_close(out[row, :t], base[:t], rtol=0, atol=1e-6, msg=f"leak into positions < {t}")
        assert not torch.allclose(out[row, t:], base[t:])  # the change did reach positions >= t


def test_partial_prefix_is_conditioning_only():
    """Partial prediction: positions < p do see the routing prefix (documented, loss-masked)."""
    m = micro_model(**ROUTING_MODES["partial"])
    p = m.config.prefix_len
    assert p == 7  # ceil(0.2 * 32)
    x = torch.randint(0, 257, (1, 32), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, p - 1] = (x[0, p - 1] + 1) % 257
    with torch.no_grad():
        a, b = m(x), m(y)
    # The router gate (a softmax probability over the first p positions) moves with the token at
    # p - 1, so earlier positions change: they are conditioning only, and training masks their loss.
    assert not torch.allclose(a[:, : p - 1], b[:, : p - 1])


@pytest.mark.parametrize("T", [1, 2, 7, 17, 31, 32])
def test_any_length_up_to_max(T):
    m = micro_model()
    x = torch.randint(0, 257, (3, T))
    with torch.no_grad():
        out = m(x)
    assert out.shape == (3, T, 257) and torch.isfinite(out).all()


def test_too_long_and_bad_ids_are_clear_errors():
    m = micro_model()
    with pytest.raises(InputError, match="exceeds max_seq_len 32"):
        m(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(InputError, match="outside the vocabulary"):
        m(torch.full((1, 4), 257, dtype=torch.long))
    with pytest.raises(InputError, match=r"\[batch, seq\]"):
        m(torch.zeros(4, dtype=torch.long))


def test_inference_routing_independent_of_batch(routed_model):
    m = routed_model
    x = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(x)
        for i in range(4):
            torch.testing.assert_close(m(x[i:i + 1]), full[i:i + 1], rtol=1e-5, atol=1e-5)


def test_sequence_prefix_equals_shorter_sequence(routed_model):
    """Running T tokens then reading positions < t equals running only t tokens (t >= p)."""
    m = routed_model
    x = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(4))
    t = max(m.config.prefix_len, 11)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:, :t], m(x[:, :t]), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), e=st.integers(1, 9), seed=st.integers(0, 1000))
def test_balanced_assignment_is_balanced(n, e, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, e, generator=g)
    scores[:, 0] += 5  # skewed: everyone prefers expert 0
    a = balanced_assignment(scores)
    assert a.shape == (n,) and a.min() >= 0 and a.max() < e
    load = torch.bincount(a, minlength=e)
    assert int(load.max() - load.min()) <= 1 and int(load.sum()) == n


def test_balanced_assignment_prefers_high_scores():
    # 4 tokens, 2 experts, each token clearly prefers one expert and the loads already balance.
    scores = torch.tensor([[5.0, 0.0], [4.0, 0.0], [0.0, 3.0], [0.0, 2.0]])
    assert balanced_assignment(scores).tolist() == [0, 0, 1, 1]


def test_training_routing_is_balanced_and_differentiable():
    m = micro_model().train()
    x = torch.randint(0, 257, (4, 32))
    loss = m(x).logsumexp(-1).mean()
    loss.backward()
    for blk in (m.blocks[i] for i in m.config.sparse_layer_ids()):
        assert blk.tmoe.centroids.grad is not None and blk.tmoe.centroids.grad.abs().sum() > 0
        assert blk.tmoe.w1.grad.abs().sum() > 0


def test_placement_rule():
    from smlp_export import SMLPConfig

    assert SMLPConfig(n_layers=8, n_sparse=2).sparse_layer_ids() == [2, 5]
    assert SMLPConfig(n_layers=12, n_sparse=3).sparse_layer_ids() == [3, 6, 9]
    assert SMLPConfig(n_layers=3, n_sparse=0).sparse_layer_ids() == []


def test_no_position_embeddings():
    m = micro_model()
    assert not any("pos" in n for n, _ in m.named_parameters())
