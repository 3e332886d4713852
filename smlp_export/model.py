"""The sMLP language model (Yu et al. 2022), as specified in docs/model.md.

``SMLPForCausalLM(config)(input_ids[B, T]) -> logits[B, T, V]``. In eval mode the MoE layers run
through the custom ops ``torch.ops.smlp.*`` (what is exported is what runs); in training mode they
call the same differentiable plain-torch references, with Base-Layers balanced assignment for
token routing.

One block forward serves the full sequence and incremental decoding: every block takes an optional
``step`` (a :class:`SpatialStep`). Without it the spatial (token-mixing) products run over the whole
sequence ``x[:, :T]``; with it only the spatial product itself is delegated to the step, which
mixes the new rows with the block's carried state (``smlp_export.decode.state``: one position for
the batch; ``decode.sequence``: one position per batch row). Everything else -- norms, GELU,
projections, token MoE, residuals -- is this file's code in both cases, so the two cannot drift.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from typing import Protocol

from . import ops
from .config import SMLPConfig
from .sampling import check_ids
from .errors import InputError, SMLPError


def _is_tracing() -> bool:
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting())


def balanced_assignment(scores: torch.Tensor) -> torch.Tensor:
    """Greedy balanced assignment (training only): every expert takes the same number of tokens.

    scores [N, E] -> expert id per token [N] int64. Capacities are N // E, and the first N % E
    experts take one more, so the loads differ by at most one and sum to N. Each round, every
    unassigned token bids for its best expert that still has room; an expert keeps its best
    bidders up to its capacity. After a round each loser's choice is full, so at most E rounds run.
    This approximates Base Layers' linear assignment (docs/model.md, [choice]).
    """
    N, E = scores.shape
    cap = torch.full((E,), N // E, dtype=torch.long, device=scores.device)
    cap[: N % E] += 1
    assigned = torch.full((N,), -1, dtype=torch.long, device=scores.device)
    s = scores.detach().float()
    for _ in range(E):
        un = (assigned < 0).nonzero().squeeze(1)
        if un.numel() == 0:
            break
        su = s[un].masked_fill((cap == 0).unsqueeze(0), float("-inf"))
        choice = su.argmax(dim=1)
        best = su.gather(1, choice[:, None]).squeeze(1)
        for e in range(E):
            bid = (choice == e).nonzero().squeeze(1)
            if bid.numel() == 0:
                continue
            take = min(int(cap[e]), bid.numel())
            win = bid[torch.topk(best[bid], take).indices]
            assigned[un[win]] = e
            cap[e] -= take
    return assigned


class SpatialStep(Protocol):
    """The spatial product of one block for new rows, with that block's carried state.

    z2 [B, S, c] (normalised) -> s [B, S, c]; the implementation keeps the block's new state. The
    three kinds: a dense gMLP block (weight [n, n], bias [n]), deterministic sMoE (weight
    [E, n, n], bias [E, n]) and partial-prediction sMoE (plus router [p, E])."""

    def dense(self, z2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor: ...

    def deterministic(self, z2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor: ...

    def partial(self, z2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                router: torch.Tensor) -> torch.Tensor: ...


class SpatialProjection(nn.Module):
    """Causal spatial projection of a dense gMLP block: ``s = tril(W)[:T, :T] @ z2 + b[:T]``."""

    def __init__(self, cfg: SMLPConfig):
        super().__init__()
        n = cfg.max_seq_len
        self.weight = nn.Parameter(torch.empty(n, n))
        self.bias = nn.Parameter(torch.empty(n))
        _init_spatial(self.weight, self.bias, cfg)

    def forward(self, z2: torch.Tensor) -> torch.Tensor:
        T = z2.shape[1]
        w = ops.causal_weight(self.weight, T)
        return torch.matmul(w, z2) + self.bias[:T, None]


def _init_spatial(weight: torch.Tensor, bias: torch.Tensor, cfg: SMLPConfig) -> None:
    # gMLP: W ~ U(-eps/n, eps/n), b = 1, so the gating unit starts near identity.
    eps = cfg.spatial_init_eps / cfg.max_seq_len
    nn.init.uniform_(weight, -eps, eps)
    nn.init.ones_(bias)


class GMLPBlock(nn.Module):
    """Dense block: pre-norm causal gMLP with residual."""

    def __init__(self, cfg: SMLPConfig):
        super().__init__()
        c = cfg.spatial_channels
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.proj_in = nn.Linear(cfg.d_model, cfg.d_ffn)
        self.norm_z2 = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.spatial = SpatialProjection(cfg)
        self.proj_out = nn.Linear(c, cfg.d_model)

    def forward(self, x: torch.Tensor, routing: dict | None = None, name: str = "",
                step: SpatialStep | None = None) -> torch.Tensor:
        z = F.gelu(self.proj_in(self.norm(x)))
        z1, z2 = z.chunk(2, dim=-1)
        z2 = self.norm_z2(z2)
        s = self.spatial(z2) if step is None else step.dense(z2, self.spatial.weight, self.spatial.bias)
        return x + self.proj_out(z1 * s)


class TokenMoE(nn.Module):
    """tMoE: ``sum gate * FFN_e(LayerNorm(x))`` with routing on the affinities ``x @ C^T``."""

    FP32_PARAMS = ("centroids",)  # float32 under mixed precision (precision.to_compute_dtype)

    def __init__(self, cfg: SMLPConfig):
        super().__init__()
        E, d, f = cfg.n_token_experts, cfg.d_model, cfg.d_expert
        self.cfg = cfg
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.centroids = nn.Parameter(torch.randn(E, d) * 0.02)
        self.w1 = nn.Parameter(torch.randn(E, f, d) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(E, f))
        self.w2 = nn.Parameter(torch.randn(E, d, f) * (0.02 / math.sqrt(2 * cfg.n_layers)))
        self.b2 = nn.Parameter(torch.zeros(E, d))
        self.aux_loss: torch.Tensor | None = None  # set by each training forward
        self.aux_kind = ""

    def forward(self, x: torch.Tensor, routing: dict | None = None, name: str = "") -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        # [N, E]; float32 under mixed precision (centroids kept fp32: smlp_export.precision)
        logits = F.linear(flat.to(self.centroids.dtype), self.centroids)
        h = self.norm(flat)
        cfg = self.cfg
        if routing is not None:
            routing[name] = logits.reshape(B, T, -1)
        if not self.training:
            y = torch.ops.smlp.token_moe(h, logits.to(h.dtype), self.w1, self.b1, self.w2, self.b2,
                                         cfg.token_routing, cfg.top_k, cfg.expert_activation)
        elif cfg.token_routing == "base":
            # Base Layers: balanced assignment in training, gate = sigmoid(affinity of the chosen expert).
            e = balanced_assignment(logits)[:, None]
            gate = torch.sigmoid(logits.gather(1, e))
            # [choice] Router-consistency loss: teach the greedy argmax to predict the balanced
            # assignment, so inference's greedy routing stays balanced too. Without it (measured on
            # the tiny preset, 3000 steps) greedy inference left experts with <0.1 % of tokens.
            self.aux_loss = F.cross_entropy(logits, e.squeeze(1))
            self.aux_kind = "router_consistency"
            y = ops.grouped_expert_ffn(h, e, gate, self.w1, self.b1, self.w2, self.b2, cfg.expert_activation)
        else:
            ids, gates = ops.route_tokens(logits, "topk", cfg.top_k)
            # Switch-Transformer load-balancing loss: E * sum_e (fraction routed to e) * (mean prob of e).
            probs = torch.softmax(logits, dim=-1)
            frac = torch.bincount(ids[:, 0], minlength=probs.shape[1]).float() / ids.shape[0]
            self.aux_loss = probs.shape[1] * (frac * probs.mean(0)).sum()
            self.aux_kind = "load_balance"
            y = ops.grouped_expert_ffn(h, ids, gates, self.w1, self.b1, self.w2, self.b2, cfg.expert_activation)
        return y.reshape(B, T, d)


class SpatialMoE(nn.Module):
    """sMoE: the gMLP shape with the spatial projection split over channel chunks / experts."""

    def __init__(self, cfg: SMLPConfig):
        super().__init__()
        E, n, c = cfg.n_spatial_experts, cfg.max_seq_len, cfg.spatial_channels
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.proj_in = nn.Linear(cfg.d_model, cfg.d_ffn)
        self.norm_z2 = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.weight = nn.Parameter(torch.empty(E, n, n))
        self.bias = nn.Parameter(torch.empty(E, n))
        _init_spatial(self.weight, self.bias, cfg)
        if cfg.spatial_routing == "partial":
            self.router = nn.Parameter(torch.randn(cfg.prefix_len, E) * 0.02)
        else:
            self.register_parameter("router", None)
        self.proj_out = nn.Linear(c, cfg.d_model)

    def forward(self, x: torch.Tensor, routing: dict | None = None, name: str = "",
                step: SpatialStep | None = None) -> torch.Tensor:
        z = F.gelu(self.proj_in(self.norm(x)))
        z1, z2 = z.chunk(2, dim=-1)
        z2 = self.norm_z2(z2)
        if step is not None:  # new rows against the carried state (incremental decoding)
            s = (step.deterministic(z2, self.weight, self.bias) if self.router is None
                 else step.partial(z2, self.weight, self.bias, self.router))
        elif self.router is None:
            fn = torch.ops.smlp.spatial_moe if not self.training else ops.spatial_moe_reference
            s = fn(z2, self.weight, self.bias)
        else:
            if routing is not None:
                routing[name] = ops.route_channels(z2, self.router)[2]  # probs [B, c, E]
            fn = torch.ops.smlp.spatial_moe_partial if not self.training else ops.spatial_moe_partial_reference
            s = fn(z2, self.weight, self.bias, self.router)
        return self.proj_out(z1 * s)


class SparseBlock(nn.Module):
    """Sparse block, post-norm: ``x = LN(x + tMoE(x)); x = LN(x + sMoE(x))``."""

    def __init__(self, cfg: SMLPConfig):
        super().__init__()
        self.tmoe = TokenMoE(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.smoe = SpatialMoE(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, routing: dict | None = None, name: str = "",
                step: SpatialStep | None = None) -> torch.Tensor:
        x = self.norm1(x + self.tmoe(x, routing, f"{name}.tmoe"))
        return self.norm2(x + self.smoe(x, routing, f"{name}.smoe", step))


class SMLPForCausalLM(nn.Module):
    """Embedding -> blocks -> final LayerNorm -> vocabulary projection. No position embeddings."""

    def __init__(self, config: SMLPConfig):
        super().__init__()
        if isinstance(config, dict):  # config.json as huggingface_hub's PyTorchModelHubMixin passes it
            config = SMLPConfig.from_dict(config)
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(
            SparseBlock(config) if config.is_sparse(i) else GMLPBlock(config) for i in range(config.n_layers)
        )
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        if self.lm_head.bias is not None:
            nn.init.zeros_(self.lm_head.bias)
        for blk in self.blocks:
            for mod in blk.modules():
                if isinstance(mod, nn.Linear):
                    nn.init.normal_(mod.weight, std=0.02)
                    nn.init.zeros_(mod.bias)

    def check_inputs(self, input_ids: torch.Tensor) -> None:
        """One clear error for inputs the model cannot take (``sampling.check_ids``; while
        tracing only the shape checks run)."""
        cfg = self.config
        check_ids(input_ids, vocab_size=cfg.vocab_size, max_tokens=cfg.max_seq_len, values=not _is_tracing(),
                  error=InputError)

    def block_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def forward(self, input_ids: torch.Tensor, routing: dict | None = None) -> torch.Tensor:
        """input_ids [B, T] int64 (1 <= T <= max_seq_len) -> logits [B, T, V] float.

        If ``routing`` is a dict it is filled with each MoE layer's router output:
        ``blocks.i.tmoe`` -> logits [B, T, E_t]; ``blocks.i.smoe`` (partial only) -> probs [B, c, E_s].
        """
        self.check_inputs(input_ids)
        return self.run_blocks(self.embed(input_ids), routing)

    def run_blocks(self, x: torch.Tensor, routing: dict | None = None,
                   steps: list[SpatialStep] | None = None) -> torch.Tensor:
        """Embedded tokens x [B, S, d] -> logits [B, S, V] through every block and the head.

        ``steps``: None for the whole sequence (the forward above), or one ``SpatialStep`` per
        block for S new tokens mixed with carried states (``smlp_export.decode``)."""
        for i, blk in enumerate(self.blocks):
            x = blk(x, routing, f"blocks.{i}", None if steps is None else steps[i])
        return self.lm_head(self.norm_f(x))

    # ---- Hugging Face layout (PyTorchModelHubMixin's conventions, offline; smlp_export/hub.py) ----
    def save_pretrained(self, save_directory, *, overwrite: bool = False, metadata: dict | None = None):
        """Write this model as a checkpoint directory (config.json + model.safetensors + ...)."""
        from .hub import save_pretrained

        return save_pretrained(self, save_directory, overwrite=overwrite, metadata=metadata)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "SMLPForCausalLM":
        """Load a local checkpoint directory (ours or PyTorchModelHubMixin's), in eval mode."""
        from .hub import from_pretrained

        return from_pretrained(pretrained_model_name_or_path, model_cls=cls, **kwargs)

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary router losses of the last training forward, summed over layers, by kind."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modules():
            if isinstance(m, TokenMoE) and m.aux_loss is not None:
                out[m.aux_kind] = out.get(m.aux_kind, 0) + m.aux_loss
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_parameters(self) -> int:
        """Parameters touched per token: all but the unselected token experts (k of E are used).

        Spatial experts are all used by every token (each owns a channel chunk), so they count fully.
        """
        cfg = self.config
        total = self.num_parameters()
        per_expert = 2 * cfg.d_model * cfg.d_expert + cfg.d_expert + cfg.d_model
        return total - len(cfg.sparse_layer_ids()) * (cfg.n_token_experts - cfg.top_k) * per_expert


def load_checkpoint(path_or_name: str | os.PathLike | None = None, *, allow_pickle: bool = False) -> SMLPForCausalLM:
    """Load a checkpoint directory (or ``"default"``/None for the embedded model) as an
    ``SMLPForCausalLM`` in eval mode (``checkpoint.load_model``: every check, one-line errors).

    Here, not in checkpoint.py: the checkpoint layer sits below the model and never names its class
    (docs/architecture.md)."""
    from .checkpoint import load_model

    return load_model(path_or_name, SMLPForCausalLM, allow_pickle=allow_pickle)


def load_checkpoint_of_export(out: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[SMLPForCausalLM, str]:
    """Load the checkpoint the export ``out`` was made from (``artifacts.checkpoint_of_export``),
    refusing one whose weights changed since. Returns (model, its path or name)."""
    from .artifacts import MANIFEST_FILE, checkpoint_of_export

    path, sha = checkpoint_of_export(out)
    model = load_checkpoint(path, allow_pickle=allow_pickle)
    if sha is not None and model.checkpoint_info["weights_sha256"] != sha:
        raise SMLPError(f"{out} is an export of {path}, whose weights have changed since (sha256 differs "
                        f"from {MANIFEST_FILE}): pass the checkpoint explicitly to use its current weights")
    return model, path
