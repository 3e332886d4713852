"""TensorRT plugin ``smlp::SMLPGroupedExpertGemm``: one GEMM per expert over rows grouped by expert.

Plain functions (tested without TensorRT): :func:`output_shape`, :func:`tile_config`,
:func:`kernel_constexprs`, :func:`launch`. :func:`register` wraps them with ``tensorrt.plugin``
(``@register`` for the output descriptor, ``@autotune`` offering the type combinations and one tactic
per tile regime, ``@aot_impl`` returning the AOT-compiled PTX of
``smlp_export.kernels.plugin_kernels.grouped_expert_gemm_plugin_kernel`` for the tactic TensorRT
sets), so engines run without Python.

Tactics: at AOT time the row count M is symbolic, so the plugin cannot pick decode or prefill tiles
itself. It offers one tactic per regime of ``smlp_export.kernels.configs.grouped_gemm_blocks`` and
TensorRT times them per optimization profile (decode T=1, prefill), keeping the fastest.
"""
from __future__ import annotations

from smlp_export.kernels.configs import GemmConfig, grouped_gemm_blocks
from smlp_plugins._aot import aot_compile
from smlp_plugins._common import constant, contract, import_trtp, register_aot, trt_dtype_name

OP_TYPE = "SMLPGroupedExpertGemm"
# The kernel's ACT codes: smlp_export.kernels.grouped_moe.ACTIVATIONS (0-3) + 4 for identity.
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3, "identity": 4}

# Custom tactic -> (regime, the grouped row count grouped_gemm_blocks is asked for). TensorRT's custom
# tactics are positive; 0 is its default tactic, set only when a combination offers no custom tactic
# (never the case here): it gets the small-prefill tiles, the M-agnostic middle ground.
TACTICS: dict[int, tuple[str, int]] = {1: ("decode", 16), 2: ("small prefill", 256), 3: ("large prefill", 4096)}
DEFAULT_TACTIC = 0
_DEFAULT_TILES = 2
# tensorrt.plugin.AutoTuneCombination strings, I/O order x, offsets, weight, bias, output: '|' ties the
# float positions together (all fp32, all fp16 or all bf16), offsets always int32, all LINEAR.
IO_TYPES = "FP32|FP16|BF16, INT32, FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16"
LAYOUTS = "LINEAR"


def output_shape(x: tuple, offsets: tuple, weight: tuple, bias: tuple) -> tuple:
    """x [M, K], offsets [E + 1], weight [E, N, K], bias [E, N] -> [M, N]; ValueError when inconsistent."""
    if len(x) != 2 or len(offsets) != 1 or len(weight) != 3 or len(bias) != 2:
        raise ValueError(f"{OP_TYPE}: need x [M, K], offsets [E + 1], weight [E, N, K], bias [E, N]")
    M, K = x
    E, N, K2 = weight
    checks = [((K,), (K2,), "x's last dim (K)"), (tuple(offsets), (E + 1,), "offsets"), (tuple(bias), (E, N), "bias")]
    for got, want, name in checks:
        if all(isinstance(v, int) for v in got + want) and got != want:
            raise ValueError(f"{OP_TYPE}: {name} has shape {got}, expected {want}")
    return (M, N)


def _pow2(v: int) -> int:
    return max(16, 1 << (v - 1).bit_length())  # tl.dot tiles are >= 16 wide


def tile_config(tactic: int, N: int, K: int, dtype: str) -> GemmConfig:
    """Tiles of ``tactic`` for an expert weight [N, K] in ``dtype`` (torch dtype name): the regime's
    ``grouped_gemm_blocks`` tiles, BLOCK_N / BLOCK_K capped at next_pow2(N) / next_pow2(K) (a wider
    tile would only load masked zeros). ValueError for a tactic the plugin never offered."""
    if tactic == DEFAULT_TACTIC:
        tactic = _DEFAULT_TILES
    if tactic not in TACTICS:
        raise ValueError(f"{OP_TYPE}: tactic {tactic} was never offered; expected one of {sorted(TACTICS)}")
    cfg = grouped_gemm_blocks(TACTICS[tactic][1], N, K, dtype)
    return GemmConfig(cfg.BLOCK_M, min(cfg.BLOCK_N, _pow2(N)), min(cfg.BLOCK_K, _pow2(K)), cfg.num_warps,
                      cfg.num_stages)


def kernel_constexprs(E: int, N: int, K: int, activation: str, tiles: GemmConfig | None = None) -> dict[str, int]:
    """The kernel's constexprs; ``tiles`` from :func:`tile_config` (None: the default tactic's fp16 tiles)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP_TYPE}: activation {activation!r} not in {sorted(ACTIVATIONS)}")
    if min(E, N, K) < 1:
        raise ValueError(f"{OP_TYPE}: E, N, K must be >= 1, got {(E, N, K)}")
    tiles = tiles or tile_config(DEFAULT_TACTIC, N, K, "float16")
    return {"E": E, "N": N, "K": K, "ACT": ACTIVATIONS[activation], "BLOCK_M": tiles.BLOCK_M,
            "BLOCK_N": tiles.BLOCK_N, "BLOCK_K": tiles.BLOCK_K}


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def launch(N: int, E: int, block_n: int, num_warps: int, shared: int) -> tuple:
    """(grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_mem): one program per (N tile, expert)."""
    return (cdiv(N, block_n), E, 1, 32 * num_warps, 1, 1, shared)


def register() -> None:
    """Register the plugin with ``tensorrt.plugin`` (TensorRT >= 10.10)."""
    trtp = import_trtp()
    c = contract(OP_TYPE)

    def desc(x, offsets, weight, bias, activation):
        # [M, N]: rows of x, output features of the experts' weights; the dtype of x
        return trtp.from_shape_expr((x.shape_expr[0], weight.shape_expr[1]), dtype=x.dtype)

    def tune(x, offsets, weight, bias, outputs):
        # Every type combination x every tile regime; TensorRT configures the combination matching the
        # network's types and times the tactics per optimization profile (decode T=1, prefill).
        return [trtp.AutoTuneCombination(IO_TYPES, LAYOUTS, sorted(TACTICS))]

    def aot(x, offsets, weight, bias, activation, outputs, tactic):
        if str(offsets.dtype).split(".")[-1] != "INT32":
            raise ValueError(f"{OP_TYPE}: offsets must be int32, got {offsets.dtype}")
        if weight.dtype != x.dtype or bias.dtype != x.dtype:
            raise ValueError(f"{OP_TYPE}: weight {weight.dtype} / bias {bias.dtype} must have x's dtype {x.dtype}")
        E = constant(weight.shape_expr[0], "weight's expert dimension")
        N = constant(weight.shape_expr[1], "weight's output dimension")
        K = constant(weight.shape_expr[2], "weight's input dimension")
        tiles = tile_config(tactic, N, K, trt_dtype_name(x.dtype))
        cx = kernel_constexprs(E, N, K, activation, tiles)
        ck = aot_compile(OP_TYPE, "grouped_expert_gemm", x.dtype, constexprs=cx, num_warps=tiles.num_warps,
                         num_stages=tiles.num_stages)
        params = trtp.KernelLaunchParams()
        (params.grid_x, params.grid_y, params.grid_z, params.block_x, params.block_y, params.block_z,
         params.shared_mem) = launch(N, E, cx["BLOCK_N"], ck.num_warps, ck.shared)
        extra = trtp.SymIntExprs(1)  # int32 M (rows of x), after the inputs, before the output
        extra[0] = trtp.SymInt32(x.shape_expr[0])
        return ck.name, ck.ptx, params, extra

    register_aot(trtp, c, desc, aot, autotune=tune)
