"""Memory an operation will need, from the config alone, checked before anything is allocated.

``estimate(cfg, op, ...)`` gives the bytes ``smlp init`` / loading a checkpoint / ``smlp export``
(with or without validation) need; ``require(...)`` compares that with what this machine has
(``MemAvailable`` in /proc/meminfo, and the cgroup's limit minus its usage when one is set) and
raises one ``MemoryEstimateError`` naming both figures if it does not fit. Everything here is
arithmetic on the config (no module is built), so a config with ``n_layers=10**6`` is refused in
microseconds instead of after minutes of building meta modules or an OOM kill.

The model terms are exact (``num_parameters`` equals ``SMLPForCausalLM.num_parameters()``, tested);
the process terms are measured on this project's exports (docs/export.md, "Large models"):

- ``BASE``: the interpreter with torch, onnx, onnxscript and ONNX Runtime imported, plus the
  traced meta graph (0.25-0.6 GB measured);
- export without validation: the largest tensor a few times over (read, cast, transformed copy),
  since weights are written one tensor at a time (``export/weights.py``);
- validation: the ONNX Runtime session (1.0-1.15x the exported weights measured; external-data
  models run with ``ort_session.LARGE_MODEL_OPTIONS``: weights memory-mapped once) plus the larger
  of one module of the streamed PyTorch reference (``validate/streamed.py``) and ORT's fused-MoE
  transient (a float32 copy of one layer's experts for a half graph): both are bounded by one tMoE
  layer in float32, plus activations.
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import SMLPConfig
from .errors import SMLPError

GiB = 1024**3
BASE = 1 * GiB  # interpreter + libraries + graph; measured 0.25-0.6 GB, rounded up
DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}
OPS = ("init", "load", "export", "export+validate")


class MemoryEstimateError(SMLPError):
    """The operation would need more memory than this machine has available."""


def _layer_counts(cfg: SMLPConfig) -> tuple[int, int]:
    """(dense blocks, sparse blocks), without listing every block (n_layers may be huge)."""
    n_sparse = len({(k * cfg.n_layers) // (cfg.n_sparse + 1) for k in range(1, cfg.n_sparse + 1)}) \
        if cfg.n_sparse <= 100_000 else cfg.n_sparse
    return cfg.n_layers - n_sparse, n_sparse


def tensor_shapes(cfg: SMLPConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each distinct parameter kind (per block kind), for sizes and the largest tensor."""
    d, f, c, n = cfg.d_model, cfg.d_ffn, cfg.spatial_channels, cfg.max_seq_len
    et, ft, es = cfg.n_token_experts, cfg.d_expert, cfg.n_spatial_experts
    return {
        "embed": (cfg.vocab_size, d), "lm_head": (cfg.vocab_size, d),
        "proj_in": (f, d), "proj_out": (d, c), "spatial": (n, n),
        "tmoe.w1": (et, ft, d), "tmoe.w2": (et, d, ft), "smoe.weight": (es, n, n),
    }


def num_parameters(cfg: SMLPConfig) -> int:
    """Exact parameter count of ``SMLPForCausalLM(cfg)`` (see model.py), by arithmetic."""
    d, f, c, n = cfg.d_model, cfg.d_ffn, cfg.spatial_channels, cfg.max_seq_len
    et, ft, es = cfg.n_token_experts, cfg.d_expert, cfg.n_spatial_experts
    n_dense, n_sparse = _layer_counts(cfg)
    gmlp = 2 * d + (d * f + f) + 2 * c + (n * n + n) + (c * d + d)  # norm, proj_in, norm_z2, spatial, proj_out
    tmoe = 2 * d + et * d + et * ft * d + et * ft + et * d * ft + et * d
    smoe = 2 * d + (d * f + f) + 2 * c + es * n * n + es * n + (c * d + d)
    if cfg.spatial_routing == "partial":
        smoe += cfg.prefix_len * es
    sparse = tmoe + 2 * d + smoe + 2 * d  # + norm1, norm2
    return cfg.vocab_size * d * 2 + 2 * d + n_dense * gmlp + n_sparse * sparse


def num_active_parameters(cfg: SMLPConfig) -> int:
    """``SMLPForCausalLM.num_active_parameters()`` by arithmetic: all but the unselected token experts."""
    _, n_sparse = _layer_counts(cfg)
    per_expert = 2 * cfg.d_model * cfg.d_expert + cfg.d_expert + cfg.d_model
    return num_parameters(cfg) - n_sparse * (cfg.n_token_experts - cfg.top_k) * per_expert


def largest_tensor_numel(cfg: SMLPConfig) -> int:
    _, n_sparse = _layer_counts(cfg)
    sizes = {k: _prod(s) for k, s in tensor_shapes(cfg).items()}
    if n_sparse == 0:
        sizes = {k: v for k, v in sizes.items() if not k.startswith(("tmoe", "smoe"))}
    return max(sizes.values())


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def estimate(cfg: SMLPConfig, op: str, *, dtype: str = "fp32", checkpoint_dtype: str = "fp32") -> int:
    """Bytes ``op`` needs at its peak (see the module docstring for the terms).

    op: "init" (streamed random init: one generated slice at a time), "load" (a checkpoint into a
    float32 model), "export" (trace + translate + save, ``dtype`` = the export's compute dtype),
    "export+validate" (export, then parity: the float32 model and an ONNX Runtime session)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose one of {', '.join(OPS)}")
    p = num_parameters(cfg)
    w32 = 4 * p
    wck = DTYPE_BYTES[checkpoint_dtype] * p
    wex = DTYPE_BYTES[dtype] * p
    big = largest_tensor_numel(cfg) * 4
    # activations of one validation case (B x T = 3 x 77 and 1 x n): a few [B T, max(f, f_t, V)]
    acts = 8 * 4 * max(3 * 77, cfg.max_seq_len) * max(cfg.d_ffn, cfg.d_expert, cfg.vocab_size, cfg.d_model)
    if op == "init":  # streamed (init_weights.py): a float32 slice, its cast and the written copy
        from .init_weights import peak_numel

        return BASE + 3 * 4 * peak_numel(cfg)
    if op == "load":
        return BASE + w32 + (wck if checkpoint_dtype not in ("fp32", "float32") else 0)
    if op == "export":
        return BASE + 3 * big
    # the session: measured 1.0x (350 M) to 1.15x (1.5 B) of the exported weights; the float32
    # reference is streamed (validate/streamed.py): one module's weights at a time, the largest
    # being a tMoE layer (w1 + w2 in float32)
    module = 4 * 2 * cfg.n_token_experts * cfg.d_expert * cfg.d_model if _layer_counts(cfg)[1] else big
    return BASE + max(3 * big, wex + wex // 6 + module + acts)


def available_bytes() -> int:
    """Memory this process may still take: MemAvailable, capped by a cgroup limit if one is set."""
    avail = _meminfo_available()
    cg = _cgroup_room()
    return min(a for a in (avail, cg) if a is not None) if (avail or cg) else 1 << 62


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_room() -> int | None:
    """cgroup v2 (memory.max - memory.current) or v1 (limit - usage); None without a limit."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_f).read_text().strip()
            if raw == "max":
                return None
            limit, usage = int(raw), int(Path(usage_f).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # v1 "no limit" is a huge number
            return None
        return max(limit - usage, 0)
    return None


def _fmt(n: int) -> str:
    return f"{n / GiB:,.1f} GiB"


def require(cfg: SMLPConfig, op: str, *, dtype: str = "fp32", checkpoint_dtype: str = "fp32",
            what: str | None = None) -> int:
    """Raise ``MemoryEstimateError`` if ``op`` on ``cfg`` needs more than ``available_bytes()``.

    Returns the estimate. The environment variable ``SMLP_SKIP_MEMORY_CHECK=1`` turns the refusal
    off (for machines whose swap or overcommit the estimate cannot see)."""
    need = estimate(cfg, op, dtype=dtype, checkpoint_dtype=checkpoint_dtype)
    have = available_bytes()
    if need > have and os.environ.get("SMLP_SKIP_MEMORY_CHECK") != "1":
        p = num_parameters(cfg)
        raise MemoryEstimateError(
            f"{what or op}: this model ({p:,} parameters, {_fmt(4 * p)} in float32) needs about "
            f"{_fmt(need)} of memory but only {_fmt(have)} is available; choose a smaller config "
            f"(or set SMLP_SKIP_MEMORY_CHECK=1 to try anyway)")
    return need


def release_freed_memory() -> None:
    """Hand memory the process no longer uses back to the system: a garbage collection, then
    glibc's ``malloc_trim(0)`` (freed heap pages otherwise stay in the process's RSS). Called
    between an export's write and its validation, whose peaks would otherwise add up: measured on
    the 350m preset, ``export --quick`` peaked 0.33 GB above ``validate --quick`` of the same
    export. A no-op where the C library has no ``malloc_trim``."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
