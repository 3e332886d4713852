"""Block sizes for the Triton kernels: a small tuned table plus a logged default.

Keys are ``(gpu_name, dtype, E, d, f)`` for the token-MoE grouped GEMMs and ``(gpu_name, dtype, n)``
for the causal spatial kernel. A shape that is not in the table gets a default chosen from the
token count and is logged once per key (never silent), so a missing tuning entry shows up in logs.

No triton import here: the table is plain data, readable and testable on any install.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

log = logging.getLogger("smlp_export.kernels")


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes of one grouped GEMM launch. BLOCK_M is also the per-expert row padding."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4
    num_stages: int = 3

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class TokenMoEConfig:
    up: GemmConfig  # hidden @ w1^T + b1, activation  -> [rows, f]
    down: GemmConfig  # h @ w2^T + b2, gate scale      -> [rows, d]


# Token counts are bucketed so one entry covers a range: decode (<= 16 rows per expert),
# small prefill, large prefill. BLOCK_M must be >= 16 (tl.dot's minimum).
_DECODE = TokenMoEConfig(GemmConfig(16, 64, 128, 4, 4), GemmConfig(16, 64, 128, 4, 4))
_SMALL = TokenMoEConfig(GemmConfig(32, 64, 64, 4, 4), GemmConfig(32, 64, 64, 4, 4))
_LARGE = TokenMoEConfig(GemmConfig(64, 128, 64, 4, 4), GemmConfig(64, 128, 64, 4, 4))
_HOPPER_LARGE = TokenMoEConfig(GemmConfig(128, 128, 64, 8, 3), GemmConfig(128, 128, 64, 8, 3))

# (gpu name substring, dtype, E, d, f) -> {token bucket: config}. Entries are starting points taken
# from the usual Hopper tile shapes, NOT yet measured on a GPU; `benchmarks/gpu_kernels.py --tune`
# reports the best candidate tile per (E, d, f, bucket) to replace them (see docs/kernels.md).
TOKEN_MOE_TABLE: dict[tuple[str, str, int, int, int], dict[str, TokenMoEConfig]] = {
    ("H200", "bfloat16", 8, 4096, 14336): {"decode": _DECODE, "small": _SMALL, "large": _HOPPER_LARGE},
    ("H100", "bfloat16", 8, 4096, 14336): {"decode": _DECODE, "small": _SMALL, "large": _HOPPER_LARGE},
    ("H200", "bfloat16", 64, 2048, 1408): {"decode": _DECODE, "small": _SMALL, "large": _LARGE},
    ("H100", "bfloat16", 64, 2048, 1408): {"decode": _DECODE, "small": _SMALL, "large": _LARGE},
}

SPATIAL_TABLE: dict[tuple[str, str, int], GemmConfig] = {
    ("H200", "bfloat16", 1024): GemmConfig(64, 64, 64, 4, 3),
    ("H100", "bfloat16", 1024): GemmConfig(64, 64, 64, 4, 3),
}

_logged: set[tuple] = set()


def _bucket(rows_per_expert: float) -> str:
    if rows_per_expert <= 16:
        return "decode"
    if rows_per_expert <= 256:
        return "small"
    return "large"


def _log_default(kind: str, key: tuple, cfg: object) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info("no tuned %s config for %s; using default %s", kind, key, cfg)


def _match(gpu: str, table_gpu: str) -> bool:
    return table_gpu.lower() in gpu.lower()


def token_moe_config(gpu: str, dtype: str, E: int, d: int, f: int, routed_rows: int) -> TokenMoEConfig:
    """Tiles for the grouped expert FFN. ``routed_rows`` = tokens * k (sets the bucket)."""
    bucket = _bucket(routed_rows / max(E, 1))
    for (g, dt, e, dd, ff), by_bucket in TOKEN_MOE_TABLE.items():
        if _match(gpu, g) and (dt, e, dd, ff) == (dtype, E, d, f):
            return by_bucket[bucket]
    cfg = {"decode": _DECODE, "small": _SMALL, "large": _LARGE}[bucket]
    _log_default("token_moe", (gpu, dtype, E, d, f, bucket), cfg)
    return cfg


def spatial_config(gpu: str, dtype: str, n: int) -> GemmConfig:
    """Tiles for the causal spatial kernel (rows = positions, columns = channels)."""
    for (g, dt, nn), cfg in SPATIAL_TABLE.items():
        if _match(gpu, g) and (dt, nn) == (dtype, n):
            return cfg
    # Untuned default: 64-wide tiles (tensor-core friendly) once sequences are long enough to fill them.
    cfg = GemmConfig(64, 64, 64, 4, 3) if n >= 128 else GemmConfig(32, 32, 32, 4, 2)
    _log_default("spatial_moe", (gpu, dtype, n), cfg)
    return cfg


# SMs of the GPUs the project targets (H100/H200 SXM: 132). The decode tiles are sized so that ONE
# active expert already gives every SM about two programs streaming its weights.
_TARGET_PROGRAMS = 2 * 132


def grouped_gemm_blocks(M_hint: int, N: int, K: int, dtype: object) -> GemmConfig:
    """Tiles for ``grouped_expert_gemm_plugin_kernel`` (grid ``(cdiv(N, BLOCK_N), E)``).

    M_hint: the number of grouped rows the launch is built for (e.g. a TensorRT profile's opt or max
    M = tokens * k); N, K: the expert weight's [N, K]; dtype: torch dtype or its name.
    - decode (M_hint <= 32: up to 16 tokens at top-2): BLOCK_M 16 (tl.dot's minimum) so an expert's
      rows are usually one chunk and its weights are read once; BLOCK_N as small as needed for ~2
      programs per SM from a single expert (the launch is memory-bound: every SM must stream
      weights), BLOCK_K large for long loads;
    - small prefill (<= 256 rows): BLOCK_M 64;
    - large prefill: 128 x 128 tiles with 8 warps (two Hopper warpgroups), the usual compute-bound tile.
    fp32 halves BLOCK_K (operands twice the bytes in shared memory). Starting points from the usual
    Hopper tile shapes, NOT measured on a GPU yet (benchmarks/gpu_kernels.py reports the achieved rates).
    """
    if M_hint < 0 or N < 1 or K < 1:
        raise ValueError(f"grouped_gemm_blocks: need M_hint >= 0, N >= 1, K >= 1, got {M_hint}, {N}, {K}")
    wide = dtype_name(dtype) == "float32"
    if M_hint <= 32:
        bn = 64
        while bn > 16 and -(-N // bn) < _TARGET_PROGRAMS:
            bn //= 2
        return GemmConfig(16, bn, 64 if wide else 128, 4, 4)
    if M_hint <= 256:
        return GemmConfig(64, 64, 32 if wide else 64, 4, 4)
    return GemmConfig(128, 128, 32 if wide else 64, 8, 3)


def dtype_name(dtype: object) -> str:
    """torch.float16 -> 'float16' (no torch import needed)."""
    return str(dtype).replace("torch.", "")


__all__ = ["GemmConfig", "TokenMoEConfig", "TOKEN_MOE_TABLE", "SPATIAL_TABLE", "token_moe_config",
           "spatial_config", "grouped_gemm_blocks", "dtype_name"]
