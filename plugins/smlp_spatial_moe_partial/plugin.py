"""TensorRT plugin ``smlp::SMLPSpatialMoEPartial``: partial-prediction spatial MoE in one node.

Plain functions (tested without TensorRT): :func:`output_shape`, :func:`kernel_constexprs`,
:func:`launch`. :func:`register` wraps them with ``tensorrt.plugin`` (``@register`` + ``@aot_impl``
returning the AOT-compiled PTX of ``spatial_moe_partial_plugin_kernel``: routing in the kernel).
"""
from __future__ import annotations

from smlp_plugins._aot import aot_compile
from smlp_plugins._common import constant, contract, import_trtp, register_aot

OP_TYPE = "SMLPSpatialMoEPartial"
BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_P, NUM_WARPS = 64, 32, 32, 16, 4


def output_shape(z2: tuple, weight: tuple, bias: tuple, router_weight: tuple, num_experts: int,
                 prefix: int) -> tuple:
    """z2 [B, T, c], weight [E, n, n], bias [E, n], router_weight [p, E] -> [B, T, c]."""
    if len(z2) != 3 or len(weight) != 3 or len(bias) != 2 or len(router_weight) != 2:
        raise ValueError(f"{OP_TYPE}: need z2 [B, T, c], weight [E, n, n], bias [E, n], router_weight [p, E]")
    B, T, c = z2
    E, n, n2 = weight
    if E != num_experts:
        raise ValueError(f"{OP_TYPE}: num_experts={num_experts} but weight has {E} experts")
    if n != n2 or tuple(bias) != (E, n):
        raise ValueError(f"{OP_TYPE}: weight {tuple(weight)} / bias {tuple(bias)} are not [E, n, n] / [E, n]")
    if tuple(router_weight) != (prefix, E):
        raise ValueError(f"{OP_TYPE}: router_weight {tuple(router_weight)} is not [prefix={prefix}, E={E}]")
    if isinstance(T, int) and T > n:
        raise ValueError(f"{OP_TYPE}: sequence length T={T} exceeds the spatial weight size n={n}")
    return (B, T, c)


def kernel_constexprs(num_experts: int, prefix: int) -> dict[str, int]:
    if prefix < 1:
        raise ValueError(f"{OP_TYPE}: prefix must be >= 1, got {prefix}")
    return {"E": num_experts, "P": prefix, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K,
            "BLOCK_P": BLOCK_P, "BLOCK_E": max(2, 1 << (num_experts - 1).bit_length())}


def cdiv(a, b):
    return (a + b - 1) // b


def launch(B, T, c, num_warps: int, shared: int, div=cdiv) -> tuple:
    """Grid (row blocks, channel blocks, B); ``div`` = trtp.cdiv for symbolic shapes."""
    return (div(T, BLOCK_M), div(c, BLOCK_N), B, 32 * num_warps, 1, 1, shared)


def register() -> None:
    trtp = import_trtp()
    c = contract(OP_TYPE)

    def desc(z2, weight, bias, router_weight, num_experts, prefix):
        return z2.like()

    def aot(z2, weight, bias, router_weight, num_experts, prefix, outputs, tactic):
        E = constant(weight.shape_expr[0], "weight's expert dimension")
        n = constant(weight.shape_expr[1], "weight's position dimension")
        ck = aot_compile(OP_TYPE, "spatial_moe_partial", z2.dtype,
                         constexprs=kernel_constexprs(E, prefix), num_warps=NUM_WARPS)
        B, T, ch = z2.shape_expr[0], z2.shape_expr[1], z2.shape_expr[2]
        params = trtp.KernelLaunchParams()
        (params.grid_x, params.grid_y, params.grid_z, params.block_x, params.block_y, params.block_z,
         params.shared_mem) = launch(B, T, ch, ck.num_warps, ck.shared, div=trtp.cdiv)
        extra = trtp.SymIntExprs(3)  # int32 T, c, n
        extra[0] = trtp.SymInt32(T)
        extra[1] = trtp.SymInt32(ch)
        extra[2] = trtp.SymInt32(n)
        return ck.name, ck.ptx, params, extra

    register_aot(trtp, c, desc, aot)
