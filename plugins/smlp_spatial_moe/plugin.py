"""TensorRT plugin ``smlp::SMLPSpatialMoE``: deterministic causal spatial MoE in one node.

Plain functions (tested without TensorRT): :func:`output_shape`, :func:`kernel_constexprs`,
:func:`launch`. :func:`register` wraps them with ``tensorrt.plugin`` (``@register`` + ``@aot_impl``
returning the AOT-compiled PTX of ``smlp_export.kernels.plugin_kernels.spatial_moe_plugin_kernel``).
"""
from __future__ import annotations

from smlp_plugins._aot import aot_compile
from smlp_plugins._common import constant, contract, import_trtp, register_aot

OP_TYPE = "SMLPSpatialMoE"
BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS = 64, 32, 32, 4


def output_shape(z2: tuple, weight: tuple, bias: tuple, num_experts: int) -> tuple:
    """z2 [B, T, c], weight [E, n, n], bias [E, n] -> [B, T, c]; ValueError on inconsistent inputs."""
    if len(z2) != 3 or len(weight) != 3 or len(bias) != 2:
        raise ValueError(f"{OP_TYPE}: need z2 [B, T, c], weight [E, n, n], bias [E, n]")
    B, T, c = z2
    E, n, n2 = weight
    if E != num_experts:
        raise ValueError(f"{OP_TYPE}: num_experts={num_experts} but weight has {E} experts")
    if n != n2 or tuple(bias) != (E, n):
        raise ValueError(f"{OP_TYPE}: weight {tuple(weight)} / bias {tuple(bias)} are not [E, n, n] / [E, n]")
    if isinstance(c, int) and c % E:
        raise ValueError(f"{OP_TYPE}: channels c={c} not divisible by num_experts={E}")
    if isinstance(T, int) and T > n:
        raise ValueError(f"{OP_TYPE}: sequence length T={T} exceeds the spatial weight size n={n}")
    return (B, T, c)


def kernel_constexprs(num_experts: int) -> dict[str, int]:
    return {"E": num_experts, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}


def cdiv(a, b):
    return (a + b - 1) // b


def launch(B, T, c, num_experts: int, num_warps: int, shared: int, div=cdiv) -> tuple:
    """Grid (row blocks, column blocks of one chunk, B * E); ``div`` = trtp.cdiv for symbolic shapes."""
    # cdiv(c / E, BLOCK_N) == cdiv(c, E * BLOCK_N) when E divides c; the latter stays symbolic-friendly
    return (div(T, BLOCK_M), div(c, num_experts * BLOCK_N), B * num_experts, 32 * num_warps, 1, 1, shared)


def register() -> None:
    trtp = import_trtp()
    c = contract(OP_TYPE)

    def desc(z2, weight, bias, num_experts):
        return z2.like()

    def aot(z2, weight, bias, num_experts, outputs, tactic):
        E = constant(weight.shape_expr[0], "weight's expert dimension")
        n = constant(weight.shape_expr[1], "weight's position dimension")
        ck = aot_compile(OP_TYPE, "spatial_moe", z2.dtype,
                         constexprs=kernel_constexprs(E), num_warps=NUM_WARPS)
        B, T, ch = z2.shape_expr[0], z2.shape_expr[1], z2.shape_expr[2]
        params = trtp.KernelLaunchParams()
        (params.grid_x, params.grid_y, params.grid_z, params.block_x, params.block_y, params.block_z,
         params.shared_mem) = launch(B, T, ch, E, ck.num_warps, ck.shared, div=trtp.cdiv)
        extra = trtp.SymIntExprs(3)  # int32 T, c, n
        extra[0] = trtp.SymInt32(T)
        extra[1] = trtp.SymInt32(ch)
        extra[2] = trtp.SymInt32(n)
        return ck.name, ck.ptx, params, extra

    register_aot(trtp, c, desc, aot)
