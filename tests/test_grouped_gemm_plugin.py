"""SMLPGroupedExpertGemm: plain plugin functions, and its kernel in the interpreter vs the reference.

The kernel (``plugin_kernels.grouped_expert_gemm_plugin_kernel``) runs on CPU under
``TRITON_INTERPRET=1`` (set here before the kernel module is imported, like tests/test_kernels.py)
on awkward shapes: empty experts, all rows on one expert, E = 1, one row, M not a multiple of the
tile, N and K not powers of two; every activation; fp32 / fp16 / bf16.
"""
from __future__ import annotations

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

gg = importlib.import_module("smlp_plugins.smlp_grouped_gemm.plugin")

TOL = {  # as tests/test_kernels.py: the same rounding points as the reference, another summation order
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def test_output_shape_and_checks():
    assert gg.output_shape(("M", 40), (5,), (4, 72, 40), (4, 72)) == ("M", 72)
    with pytest.raises(ValueError, match="x's last dim"):
        gg.output_shape((9, 41), (5,), (4, 72, 40), (4, 72))
    with pytest.raises(ValueError, match="offsets"):
        gg.output_shape((9, 40), (4,), (4, 72, 40), (4, 72))
    with pytest.raises(ValueError, match="bias"):
        gg.output_shape((9, 40), (5,), (4, 72, 40), (4, 40))


def test_constexprs_and_launch_cover_every_output_tile():
    cx = gg.kernel_constexprs(8, 14336, 4096, "silu")
    assert (cx["E"], cx["N"], cx["K"], cx["ACT"]) == (8, 14336, 4096, 3)
    assert gg.kernel_constexprs(2, 40, 24, "identity")["ACT"] == 4
    with pytest.raises(ValueError, match="activation"):
        gg.kernel_constexprs(2, 40, 24, "swish")
    for E, N in [(1, 1), (3, 72), (8, 14336), (5, 65)]:
        cx = gg.kernel_constexprs(E, N, 64, "gelu")
        gx, gy, gz, bx, by, bz, sm = gg.launch(N, E, cx["BLOCK_N"], 4, 1024)
        assert gx * cx["BLOCK_N"] >= N > (gx - 1) * cx["BLOCK_N"] and (gy, gz) == (E, 1)
        assert (bx, by, bz, sm) == (128, 1, 1, 1024)


SHAPES = {  # name: (rows per expert, N, K)
    "uneven+empty": ([5, 0, 37, 3], 40, 24),
    "all-on-one": ([0, 0, 70, 0], 33, 20),
    "E1": ([19], 17, 48),
    "one-row": ([0, 1], 16, 16),
}


@pytest.mark.triton
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("activation", sorted(gg.ACTIVATIONS))
def test_kernel_matches_reference(activation, shape, dtype):
    pytest.importorskip("triton", reason="triton extra not installed: pip install -e '.[triton]'")
    from smlp_export.kernels import plugin_kernels as pk
    from smlp_export.kernels._util import interp_bf16
    from smlp_export.ops.grouped_gemm import grouped_expert_gemm_reference

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs in the interpreter (a GPU run checks the kernel in benchmarks/)")
    assert type(pk.grouped_expert_gemm_plugin_kernel).__name__ == "InterpretedFunction", (
        "plugin_kernels was imported before TRITON_INTERPRET=1 was set; run with TRITON_INTERPRET=1")
    counts, N, K = SHAPES[shape]
    E, M = len(counts), sum(counts)
    g = torch.Generator().manual_seed(len(shape) * 31 + N)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(E, N, K, generator=g) * K ** -0.5).to(dtype)
    b = (torch.randn(E, N, generator=g) * 0.1).to(dtype)
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    # one spare row past M: the kernel must never write it (offsets are clamped to M)
    out = torch.full((M + 1, N), 7.0, dtype=dtype)
    cx = gg.kernel_constexprs(E, N, K, activation)
    cx.update(BLOCK_M=16, BLOCK_K=16)  # small tiles: several row and K chunks on these shapes
    grid = gg.launch(N, E, cx["BLOCK_N"], 4, 0)[:3]
    pk.grouped_expert_gemm_plugin_kernel[grid](x, offsets, w, b, M, out, **cx, INTERP_BF16=interp_bf16(dtype))
    want = grouped_expert_gemm_reference(x, offsets, w, b, activation)
    torch.testing.assert_close(out[:M].float(), want.float(), **TOL[dtype])
    assert (out[M] == 7.0).all()
