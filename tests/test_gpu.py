"""CUDA path: the custom ops dispatch to the Triton kernels and match the CPU references.

Run on a GPU machine as its own session, so the kernels compile for the GPU instead of the CPU
interpreter that tests/test_kernels.py switches on:  TRITON_INTERPRET=0 pytest -m gpu tests/test_gpu.py
"""
from __future__ import annotations

import os

import pytest
import torch

from smlp_export import load_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 in this session: run `TRITON_INTERPRET=0 pytest -m gpu tests/test_gpu.py`"),
]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("routing,k", [("base", 1), ("topk", 2)])
def test_token_moe_cuda_matches_cpu(dtype, routing, k):
    from smlp_export.ops import token_moe_reference

    g = torch.Generator().manual_seed(0)
    N, d, f, E = 511, 256, 512, 8
    args = [torch.randn(N, d, generator=g), torch.randn(N, E, generator=g), torch.randn(E, f, d, generator=g) / 16,
            torch.randn(E, f, generator=g), torch.randn(E, d, f, generator=g) / 22, torch.randn(E, d, generator=g)]
    args = [a.to(dtype) for a in args]
    ref = token_moe_reference(*args, routing, k, "gelu_tanh")
    got = torch.ops.smlp.token_moe(*[a.cuda() for a in args], routing, k, "gelu_tanh").cpu()
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])


def test_default_model_cuda_matches_cpu():
    m = load_checkpoint(None)
    x = torch.randint(0, 256, (3, 77))
    with torch.no_grad():
        ref = m(x)
        got = m.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, ref, **TOL[torch.float32])


def _gemm_args(rows: list[int], N: int, K: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    E = len(rows)
    offsets = torch.tensor([0] + rows).cumsum(0).to(torch.int32)
    x = torch.randn(sum(rows), K, generator=g).to(dtype)
    w = (torch.randn(E, N, K, generator=g) * K ** -0.5).to(dtype)
    b = (torch.randn(E, N, generator=g) * 0.1).to(dtype)
    return x, offsets, w, b


GEMM_ROWS = {
    "decode_1_token": [0, 1, 0, 0],
    "decode_top2_8_tokens": [3, 4, 0, 2, 5, 2, 0, 0],  # 16 rows: the BLOCK_M 16 regime
    "prefill_skewed": [300, 0, 17, 700],  # several 128-row chunks, an empty expert
}


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("rows", list(GEMM_ROWS))
@pytest.mark.parametrize("activation", ["identity", "gelu_tanh", "silu"])
def test_grouped_expert_gemm_cuda_matches_cpu(dtype, rows, activation):
    """torch.ops.smlp.grouped_expert_gemm on CUDA runs the plugin's Triton kernel; CPU the reference."""
    from smlp_export.ops import grouped_expert_gemm_reference

    x, off, w, b = _gemm_args(GEMM_ROWS[rows], N=520, K=392, dtype=dtype)
    ref = grouped_expert_gemm_reference(x, off, w, b, activation)
    got = torch.ops.smlp.grouped_expert_gemm(x.cuda(), off.cuda(), w.cuda(), b.cuda(), activation).cpu()
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_plugin_spatial_kernels_cuda_match_cpu(dtype):
    """The spatial plugin kernels (TensorRT runs them AOT) launched on CUDA with the plugins' tiles."""
    import triton

    from smlp_export.kernels import plugin_kernels as pk
    from smlp_export.kernels._util import interp_bf16
    from smlp_export.ops import spatial_moe_partial_reference, spatial_moe_reference

    g = torch.Generator().manual_seed(3)
    B, T, c, E, n, p = 2, 301, 96, 4, 320, 64
    z2 = torch.randn(B, T, c, generator=g).to(dtype)
    w = (torch.randn(E, n, n, generator=g) * n ** -0.5).to(dtype)
    bias = torch.randn(E, n, generator=g).to(dtype)
    # Unambiguous routing (CPU and GPU sum the router logits in different orders, so a near-tie
    # could flip a decision): position e < E of each column is 4 for its expert, the router reads it.
    pick = torch.randint(0, E, (B, c), generator=g)
    z2[:, :E, :] = 0
    z2[:, :E, :].scatter_(1, pick[:, None, :], 4.0)
    router = torch.zeros(p, E, dtype=dtype)
    router[torch.arange(E), torch.arange(E)] = 1
    zc, wc, bc, rc = z2.cuda(), w.cuda(), bias.cuda(), router.cuda()
    out = torch.empty_like(zc)
    pk.spatial_moe_plugin_kernel[(triton.cdiv(T, 64), triton.cdiv(c // E, 32), B * E)](
        zc, wc, bc, T, c, n, out, E=E, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, INTERP_BF16=interp_bf16(dtype))
    torch.testing.assert_close(out.cpu().float(), spatial_moe_reference(z2, w, bias).float(), **TOL[dtype])
    for block_n in (32, 128):
        out = torch.empty_like(zc)
        pk.spatial_moe_partial_plugin_kernel[(triton.cdiv(T, 64), triton.cdiv(c, block_n), B)](
            zc, wc, bc, rc, T, c, n, out, E=E, P=p, BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=32, BLOCK_P=16, BLOCK_E=4,
            INTERP_BF16=interp_bf16(dtype))
        torch.testing.assert_close(out.cpu().float(), spatial_moe_partial_reference(z2, w, bias, router).float(),
                                   **TOL[dtype])
