"""``SMLPConfig``: the architecture of an sMLP language model (see docs/model.md).

The config is a plain dataclass with a JSON round trip. ``validate()`` runs on construction and
on load, and every problem is a ``ConfigError`` naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

TOKEN_ROUTINGS = ("base", "topk")
SPATIAL_ROUTINGS = ("deterministic", "partial")
# "gelu_tanh" is the default expert activation because ONNX Runtime's fused com.microsoft.MoE
# implements gelu with the tanh approximation (measured: 3.8e-6 against tanh-GELU, 2.4e-3
# against erf-GELU). Training with the same activation keeps the `ort` export exact.
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
CONFIG_FORMAT = 1
# Plausibility bounds: far beyond any sMLP (the paper's largest is d=2048, n=1024, 64 experts,
# ~24 blocks) yet small enough that a typo (n_layers=1000000, d_model=400000) is refused by
# arithmetic before a module, a memory estimate or a file exists.
LIMITS: dict[str, int] = {
    "vocab_size": 1 << 20, "d_model": 65536, "n_layers": 1024, "max_seq_len": 16384, "d_ffn": 262144,
    "n_token_experts": 4096, "d_expert": 262144, "n_spatial_experts": 1024,
}


@dataclass
class SMLPConfig:
    """Architecture of an sMLP model.

    Blocks: ``n_layers`` = N1 dense (causal gMLP) + ``n_sparse`` = N2 sparse (tMoE + sMoE);
    0-based block i is sparse iff ``i == floor(k * n_layers / (n_sparse + 1))`` for k in 1..N2.
    """

    vocab_size: int = 257
    d_model: int = 128
    n_layers: int = 6
    n_sparse: int = 2
    max_seq_len: int = 128
    d_ffn: int = 512  # gMLP / sMoE up-projection width f; spatial channels c = f / 2
    # token MoE (tMoE)
    n_token_experts: int = 4
    d_expert: int = 512  # hidden width f_t of each token expert FFN
    token_routing: str = "base"  # "base": greedy top-1 with sigmoid gate; "topk": softmax over top-k
    top_k: int = 1
    expert_activation: str = "gelu_tanh"
    # spatial MoE (sMoE)
    n_spatial_experts: int = 4
    spatial_routing: str = "deterministic"  # or "partial" (partial prediction)
    partial_fraction: float = 0.2  # p = ceil(partial_fraction * max_seq_len)
    # misc
    layer_norm_eps: float = 1e-5
    spatial_init_eps: float = 1e-3
    eos_token_id: int | None = 256  # None: a vocabulary without EOS (generation stops on length only)
    # Bias on the vocabulary projection (g-mlp-pytorch's to_logits Linear has one). Off by default, so
    # checkpoints and exports made without it are unchanged.
    lm_head_bias: bool = False
    format_version: int = CONFIG_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived -------------------------------------------------------------------------
    @property
    def spatial_channels(self) -> int:
        """c: channels of z2 (half of ``d_ffn``)."""
        return self.d_ffn // 2

    @property
    def prefix_len(self) -> int:
        """p: positions the partial-prediction router sees (0 for deterministic routing)."""
        if self.spatial_routing != "partial":
            return 0
        return math.ceil(self.partial_fraction * self.max_seq_len)

    def sparse_layer_ids(self) -> list[int]:
        """0-based indices of the sparse blocks (the paper's even-spread placement rule)."""
        L, n2 = self.n_layers, self.n_sparse
        return sorted({(k * L) // (n2 + 1) for k in range(1, n2 + 1)})

    def is_sparse(self, i: int) -> bool:
        return i in self.sparse_layer_ids()

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid config: {msg}")

        ints = ("vocab_size", "d_model", "n_layers", "n_sparse", "max_seq_len", "d_ffn",
                "n_token_experts", "d_expert", "top_k", "n_spatial_experts", "format_version")
        for name in ints:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool), f"{name} must be an integer, got {v!r}")
        # Type and finiteness first, so every later comparison sees a real number and a bad value
        # (a string, a bool, NaN/Infinity from JSON or `--set`) is named instead of crashing.
        for name in ("partial_fraction", "layer_norm_eps", "spatial_init_eps"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool),
                 f"{name} must be a number, got {v!r}")
            need(math.isfinite(v), f"{name} must be finite, got {v!r}")
        for name in ("token_routing", "spatial_routing", "expert_activation"):
            v = getattr(self, name)
            need(isinstance(v, str), f"{name} must be a string, got {v!r}")
        if self.eos_token_id is not None:
            need(isinstance(self.eos_token_id, int) and not isinstance(self.eos_token_id, bool),
                 f"eos_token_id must be an integer or null, got {self.eos_token_id!r}")
        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len", "d_ffn", "n_token_experts",
                     "d_expert", "n_spatial_experts", "top_k"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name, limit in LIMITS.items():
            need(getattr(self, name) <= limit,
                 f"{name} = {getattr(self, name)} is beyond any sMLP (at most {limit}; config.LIMITS)")
        need(self.format_version == CONFIG_FORMAT,
             f"unknown format_version {self.format_version} (this version reads {CONFIG_FORMAT})")
        need(self.n_sparse >= 0, f"n_sparse must be >= 0, got {self.n_sparse}")
        need(self.n_sparse <= self.n_layers,
             f"n_sparse (N2={self.n_sparse}) must be <= n_layers (L={self.n_layers})")
        need(self.d_ffn % 2 == 0, f"d_ffn must be even (it is split into z1 and z2), got {self.d_ffn}")
        need(self.token_routing in TOKEN_ROUTINGS,
             f"unknown token_routing {self.token_routing!r}; choose one of {', '.join(TOKEN_ROUTINGS)}")
        need(self.spatial_routing in SPATIAL_ROUTINGS,
             f"unknown spatial_routing {self.spatial_routing!r}; choose one of {', '.join(SPATIAL_ROUTINGS)}")
        need(self.expert_activation in ACTIVATIONS,
             f"unknown expert_activation {self.expert_activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.token_routing == "base":
            need(self.top_k == 1, f"token_routing 'base' is greedy top-1: top_k must be 1, got {self.top_k}")
        else:
            need(self.top_k in (1, 2), f"top_k must be 1 or 2 for token_routing 'topk', got {self.top_k}")
            need(self.top_k <= self.n_token_experts,
                 f"top_k ({self.top_k}) must be <= n_token_experts ({self.n_token_experts})")
        c = self.spatial_channels
        if self.spatial_routing == "deterministic":
            need(c % self.n_spatial_experts == 0,
                 f"spatial channels c = d_ffn/2 = {c} not divisible by n_spatial_experts = {self.n_spatial_experts}")
        need(isinstance(self.partial_fraction, (int, float)) and 0 < self.partial_fraction < 1,
             f"partial_fraction must be in (0, 1), got {self.partial_fraction!r}")
        need(self.layer_norm_eps > 0, f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        need(self.spatial_init_eps >= 0, f"spatial_init_eps must be >= 0, got {self.spatial_init_eps}")
        if self.eos_token_id is not None:
            need(0 <= self.eos_token_id < self.vocab_size,
                 f"eos_token_id {self.eos_token_id} outside the vocabulary [0, {self.vocab_size})")
        need(isinstance(self.lm_head_bias, bool), f"lm_head_bias must be true or false, got {self.lm_head_bias!r}")
        need(isinstance(self.extra, dict), "extra must be a JSON object")

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SMLPConfig":
        if not isinstance(d, dict):
            raise ConfigError("invalid config: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"invalid config: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:  # pragma: no cover - defensive
            raise ConfigError(f"invalid config: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "SMLPConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid config: not JSON ({e})") from None
        except RecursionError:
            raise ConfigError("invalid config: JSON nested too deeply to read") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> "SMLPConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default model's architecture (about 3.2 M parameters).
    "tiny": dict(d_model=128, n_layers=8, n_sparse=2, max_seq_len=128, d_ffn=512,
                 n_token_experts=8, d_expert=512, n_spatial_experts=4),
    # For tests: seconds to build and run.
    "micro": dict(d_model=32, n_layers=3, n_sparse=2, max_seq_len=32, d_ffn=64,
                  n_token_experts=4, d_expert=64, n_spatial_experts=4),
    # n = 1024 shapes by size (docs/model.md, "Presets", says which values are the paper's).
    # small: ~221 M parameters (~80 M active per token), what a 2-core CPU can benchmark.
    "small": dict(d_model=768, n_layers=12, n_sparse=2, max_seq_len=1024, d_ffn=3072,
                  n_token_experts=16, d_expert=3072, n_spatial_experts=8),
    # Export-scaling benchmark shapes (benchmarks/export_scaling.py): ~108 M, ~372 M, ~1.51 B.
    "100m": dict(d_model=768, n_layers=8, n_sparse=2, max_seq_len=1024, d_ffn=3072,
                 n_token_experts=6, d_expert=3072, n_spatial_experts=8),
    "350m": dict(d_model=1024, n_layers=12, n_sparse=2, max_seq_len=1024, d_ffn=4096,
                 n_token_experts=16, d_expert=4096, n_spatial_experts=8),
    "1.5b": dict(d_model=1024, n_layers=12, n_sparse=2, max_seq_len=1024, d_ffn=4096,
                 n_token_experts=84, d_expert=4096, n_spatial_experts=8),
    # The paper's scales (~3.5 B and ~9.4 B parameters; d = 1024 / n = 1024 / 64 experts from
    # the paper, layers, sparse blocks, widths and spatial experts ours): 3.50 B and 9.30 B.
    "3.5b": dict(d_model=1024, n_layers=24, n_sparse=6, max_seq_len=1024, d_ffn=4096,
                 n_token_experts=64, d_expert=4096, n_spatial_experts=16),
    "9.4b": dict(d_model=2048, n_layers=24, n_sparse=4, max_seq_len=1024, d_ffn=8192,
                 n_token_experts=64, d_expert=8192, n_spatial_experts=16),
}


def preset(name: str, **overrides: Any) -> SMLPConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return SMLPConfig.from_dict({**PRESETS[name], **overrides})  # names unknown fields
