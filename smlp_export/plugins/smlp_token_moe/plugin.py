"""TensorRT plugin ``smlp::SMLPTokenMoE``: token MoE (routing + expert FFN + combine) in one node.

Plain functions (tested without TensorRT): :func:`output_shape`, :func:`kernel_constexprs`,
:func:`launch`. :func:`register` wraps them with ``tensorrt.plugin`` (``@register`` for output
descriptors, ``@aot_impl`` returning the AOT-compiled PTX of
``smlp_export.kernels.plugin_kernels.token_moe_plugin_kernel``), so engines run without Python.
"""
from __future__ import annotations

from smlp_export.plugins._aot import aot_compile
from smlp_export.plugins._common import constant, contract, import_trtp, register_aot

OP_TYPE = "SMLPTokenMoE"
ROUTINGS = {"base": 0, "topk": 1}
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}
# The kernel recomputes the up-projection once per d-chunk (no scratch memory in an AOT plugin), so
# the d-chunk is as wide as registers allow: d <= 1024 -> no recompute; d = 4096 -> 4x w1 reads.
MAX_BLOCK_D, BLOCK_F, NUM_WARPS = 1024, 8, 8


def output_shape(hidden: tuple, router_logits: tuple, w1: tuple, b1: tuple, w2: tuple, b2: tuple
                 ) -> tuple:
    """Validated output shape: hidden [N, d] -> [N, d]. Raises ValueError on inconsistent inputs."""
    if len(hidden) != 2:
        raise ValueError(f"hidden must be [N, d], got rank {len(hidden)}")
    N, d = hidden
    E, f, d1 = w1
    checks = [(tuple(router_logits), (N, E), "router_logits"), (tuple(b1), (E, f), "b1"),
              (tuple(w2), (E, d, f), "w2"), (tuple(b2), (E, d), "b2"), ((d1,), (d,), "w1's last dim")]
    for got, want, name in checks:
        if all(isinstance(x, int) for x in got + want) and got != want:
            raise ValueError(f"{OP_TYPE}: {name} has shape {got}, expected {want}")
    return (N, d)


def kernel_constexprs(E: int, d: int, routing: str, k: int, activation: str) -> dict[str, int]:
    if routing not in ROUTINGS:
        raise ValueError(f"{OP_TYPE}: routing {routing!r} not in {sorted(ROUTINGS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP_TYPE}: activation {activation!r} not in {sorted(ACTIVATIONS)}")
    if not (1 <= k <= 2) or (routing == "base" and k != 1) or k > E:
        raise ValueError(f"{OP_TYPE}: k={k} unsupported for routing {routing!r} with E={E} (k in 1..2)")
    return {"E": E, "ROUTING": ROUTINGS[routing], "K": k, "ACT": ACTIVATIONS[activation],
            "BLOCK_E": _pow2(E), "BLOCK_D": min(_pow2(d), MAX_BLOCK_D), "BLOCK_F": BLOCK_F}


def _pow2(x: int) -> int:
    return max(2, 1 << (x - 1).bit_length())


def launch(N, num_warps: int, shared: int) -> tuple:
    """(grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_mem): one program per token."""
    return (N, 1, 1, 32 * num_warps, 1, 1, shared)


def register() -> None:
    """Register the plugin with ``tensorrt.plugin`` (TensorRT >= 10.10)."""
    trtp = import_trtp()
    c = contract(OP_TYPE)

    def desc(hidden, router_logits, w1, b1, w2, b2, routing, k, activation):
        out = hidden.like()  # [N, d], same dtype
        return out

    def aot(hidden, router_logits, w1, b1, w2, b2, routing, k, activation, outputs, tactic):
        E = constant(w1.shape_expr[0], "w1's expert dimension")
        d = constant(w1.shape_expr[2], "w1's model dimension")
        ck = aot_compile(OP_TYPE, "token_moe", hidden.dtype,
                         constexprs=kernel_constexprs(E, d, routing, k, activation), num_warps=NUM_WARPS)
        params = trtp.KernelLaunchParams()
        (params.grid_x, params.grid_y, params.grid_z, params.block_x, params.block_y, params.block_z,
         params.shared_mem) = launch(hidden.shape_expr[0], ck.num_warps, ck.shared)
        extra = trtp.SymIntExprs(2)  # int32 scalars d, f (after the inputs, before the output)
        extra[0] = trtp.SymInt32(hidden.shape_expr[1])
        extra[1] = trtp.SymInt32(w1.shape_expr[1])
        return ck.name, ck.ptx, params, extra

    register_aot(trtp, c, desc, aot)
