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
