"""Torch launcher of the grouped expert GEMM (``smlp::grouped_expert_gemm`` on CUDA tensors).

The same kernel the TensorRT plugin ``SMLPGroupedExpertGemm`` runs AOT
(``plugin_kernels.grouped_expert_gemm_plugin_kernel``), so the torch path, the interpreter tests and
the engine share one implementation. Tiles come from ``configs.grouped_gemm_blocks``.
"""
from __future__ import annotations

import torch
import triton

from ._util import interp_bf16
from .configs import GemmConfig, grouped_gemm_blocks
from .plugin_kernels import GEMM_ACT_CODES, grouped_expert_gemm_plugin_kernel

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def grouped_expert_gemm(x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        activation: str, config: GemmConfig | None = None) -> torch.Tensor:
    """Kernel twin of ``torch.ops.smlp.grouped_expert_gemm``.

    x [M, K] fp32/fp16/bf16, rows grouped by expert; offsets [E + 1] int (expert e owns rows
    offsets[e]:offsets[e+1]); weight [E, N, K]; bias [E, N] (dtype of x). Returns [M, N] in x's dtype.
    The offsets' values are not checked here (that would need a device-to-host sync); the kernel
    clamps them to [0, M], so bad offsets give wrong rows, never an out-of-bounds access. Rows no
    expert owns are left as allocated (the reference raises on such offsets).
    """
    if activation not in GEMM_ACT_CODES:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(GEMM_ACT_CODES)}")
    if x.dim() != 2 or weight.dim() != 3 or bias.dim() != 2 or offsets.dim() != 1:
        raise ValueError(f"grouped_expert_gemm shapes: x {tuple(x.shape)}, offsets {tuple(offsets.shape)}, "
                         f"weight {tuple(weight.shape)}, bias {tuple(bias.shape)} "
                         "(need x [M, K], offsets [E+1], weight [E, N, K], bias [E, N])")
    M, K = x.shape
    E, N, K2 = weight.shape
    if K2 != K or tuple(bias.shape) != (E, N) or offsets.numel() != E + 1:
        raise ValueError(f"grouped_expert_gemm shapes: x {tuple(x.shape)}, offsets {tuple(offsets.shape)}, "
                         f"weight {tuple(weight.shape)}, bias {tuple(bias.shape)} "
                         "(need weight [E, N, K] with x's K, bias [E, N], offsets [E+1])")
    if x.dtype not in FLOAT_DTYPES or weight.dtype != x.dtype or bias.dtype != x.dtype:
        raise ValueError(f"grouped_expert_gemm dtypes: x {x.dtype}, weight {weight.dtype}, bias {bias.dtype} "
                         "(need one of float32/float16/bfloat16 for all three)")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"grouped_expert_gemm: offsets must be int32/int64, got {offsets.dtype}")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    cfg = config or grouped_gemm_blocks(M, N, K, x.dtype)
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    offsets = offsets.to(torch.int32).contiguous()
    grouped_expert_gemm_plugin_kernel[(triton.cdiv(N, cfg.BLOCK_N), E, 1)](
        x, offsets, weight, bias, M, out,
        E=E, N=N, K=K, ACT=GEMM_ACT_CODES[activation],
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, INTERP_BF16=interp_bf16(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


__all__ = ["grouped_expert_gemm"]
