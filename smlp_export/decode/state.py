"""Incremental decoding of an sMLP with a spatial-state cache (PyTorch).

An sMLP has no attention, but every block mixes tokens with a causal spatial projection
``s[t] = sum_{u <= t} W[t, u] * z2[u] + b[t]`` (dense gMLP blocks: one W; sparse blocks: one W_e per
channel chunk / expert). Decoding token by token therefore needs, per block, the normalised ``z2``
rows of all earlier positions: the block's *spatial state*, ``[B, max_seq_len, c]``.

``step(model, input_ids[B, S], position, states)`` runs S new tokens at absolute positions
``position .. position + S - 1``:

1. the new ``z2`` rows are written into the state at rows ``[position, position + S)``;
2. the spatial output of the new rows is ``where(u <= t, W[t, u], 0) @ state`` over *all* n state
   rows (rows ``t = position + i``). Rows above ``t`` get weight exactly 0, so this equals the full
   forward's ``tril(W[:T, :T]) @ z2`` row t; using all n columns keeps every shape static (the same
   code exports to one ONNX graph for every position) and makes a step's cost independent of the
   position. State rows that were never written must be finite (``init_states`` gives zeros).

Routing semantics equal the full forward pass: token MoE is per token (the same custom op on the
new rows); deterministic sMoE is static (chunk i -> expert i); partial-prediction sMoE routes each
(sequence, channel) from the first p rows of z2, which the state holds once ``position + S >= p``.
The full forward re-routes *every* position when the sequence grows past p, which no cache can
reproduce, so a partial model must be prefilled with at least p tokens (``InputError`` otherwise);
from then on the routing is recomputed from the fixed state rows ``[0, p)`` (identical each step).

The same ``DecodeStep`` module is traced for ``decode.onnx`` (see ``export.py``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from ..model import GMLPBlock, SMLPForCausalLM, SparseBlock


def state_names(model: SMLPForCausalLM) -> list[str]:
    """One spatial state per block (every block mixes tokens), in block order."""
    return [f"state.blocks.{i}" for i in range(len(model.blocks))]


def state_shape(model: SMLPForCausalLM, batch: int) -> tuple[int, int, int]:
    """[B, max_seq_len, c] with c = d_ffn / 2."""
    cfg = model.config
    return (batch, cfg.max_seq_len, cfg.spatial_channels)


def init_states(model: SMLPForCausalLM, batch: int, dtype: torch.dtype | None = None,
                device: torch.device | None = None) -> list[torch.Tensor]:
    """Fresh (zero) spatial states, one ``[batch, max_seq_len, c]`` tensor per block.

    dtype / device default to the model's parameters.
    """
    if batch < 1:
        raise InputError(f"batch must be >= 1, got {batch}")
    p = next(model.parameters())
    return [torch.zeros(state_shape(model, batch), dtype=dtype or p.dtype, device=device or p.device)
            for _ in model.blocks]


def _masked_rows(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """weight [..., n, n], rows [S] int64 -> ``where(u <= rows[i], weight[..., rows[i], u], 0)``
    of shape [..., S, n] (the causal rows of W for the new positions)."""
    n = weight.shape[-1]
    w = weight.index_select(-2, rows)
    keep = torch.arange(n, device=rows.device)[None, :] <= rows[:, None]  # [S, n]
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


def _update(state: torch.Tensor, rows: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """state [B, n, c] with rows ``rows`` replaced by z2 [B, S, c] (out of place).

    Written as ``index_put`` with explicit (batch, row) indices because that exports to ONE
    ``ScatterND(state, indices[B, S, 2], z2)`` on the state's own layout; ``index_copy(1, ...)``
    exported as Transpose -> ScatterND -> Transpose, i.e. two full copies of the state per step.
    A bare ScatterND is what ONNX Runtime runs in place when its output is bound to the input buffer.
    """
    B, S = z2.shape[0], z2.shape[1]
    b = torch.arange(B, device=z2.device)[:, None].expand(B, S)
    return state.index_put((b, rows[None, :].expand(B, S)), z2)


def dense_spatial_step(z2: torch.Tensor, state: torch.Tensor, rows: torch.Tensor,
                       weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gMLP spatial projection for new rows. z2 [B, S, c]; state [B, n, c]; weight [n, n];
    bias [n] -> (s [B, S, c], new state [B, n, c])."""
    new = _update(state, rows, z2)
    s = torch.matmul(_masked_rows(weight, rows), new) + bias.index_select(0, rows)[:, None]
    return s, new


def deterministic_smoe_step(z2: torch.Tensor, state: torch.Tensor, rows: torch.Tensor,
                            weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic sMoE for new rows: channel chunk e uses expert e. weight [E, n, n]; bias [E, n]."""
    B, S, c = z2.shape
    E, n = weight.shape[0], weight.shape[-1]
    new = _update(state, rows, z2)
    w = _masked_rows(weight, rows)  # [E, S, n]
    chunks = new.reshape(B, n, E, c // E).permute(2, 0, 1, 3)  # [E, B, n, cs]
    y = torch.matmul(w[:, None], chunks) + bias.index_select(1, rows)[:, None, :, None]  # [E, B, S, cs]
    return y.permute(1, 2, 0, 3).reshape(B, S, c), new


def partial_route(state: torch.Tensor, router: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial-prediction routing per (sequence, channel) from state rows [0, p) (router [p, E]):
    (gate [B, c] in ``dtype``, expert [B, c]). The router product runs in >= fp32, as
    ``routing.route_channels`` does in the full forward."""
    p = router.shape[0]
    dt = torch.promote_types(dtype, torch.float32)
    logits = torch.matmul(state[:, :p, :].transpose(1, 2).to(dt), router.to(dt))  # [B, c, E]
    probs = torch.softmax(logits.float(), dim=-1).to(dtype)
    return probs.max(dim=-1)


def partial_smoe_step(z2: torch.Tensor, state: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor, router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial-prediction sMoE for new rows. Routing per (sequence, channel) from state rows [0, p)
    (router [p, E]); valid only once those rows are filled (the caller checks position + S >= p)."""
    B, S, c = z2.shape
    new = _update(state, rows, z2)
    gate, expert = partial_route(new, router, z2.dtype)
    w = _masked_rows(weight, rows)  # [E, S, n]
    y = torch.matmul(w[None], new[:, None]) + bias.index_select(1, rows)[None, :, :, None]  # [B, E, S, c]
    idx = expert[:, None, None, :].expand(B, 1, S, c)
    y = y.gather(1, idx).squeeze(1)  # each channel's own expert
    return y * gate[:, None, :], new


def run_blocks(m: SMLPForCausalLM, x: torch.Tensor, states: Sequence[torch.Tensor], rows: torch.Tensor,
               dense, deterministic, partial) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's blocks over new tokens ``x`` [B, S, d] at ``rows``, with the spatial products taken
    from the state by ``dense`` / ``deterministic`` / ``partial`` (``*_step``: one position for the
    batch; ``sequence.*_rows``: one per row). Returns (logits [B, S, V], new states)."""
    new_states = []
    for blk, state in zip(m.blocks, states):
        if isinstance(blk, GMLPBlock):
            z = F.gelu(blk.proj_in(blk.norm(x)))
            z1, z2 = z.chunk(2, dim=-1)
            s, st = dense(blk.norm_z2(z2), state, rows, blk.spatial.weight, blk.spatial.bias)
            x = x + blk.proj_out(z1 * s)
        else:
            assert isinstance(blk, SparseBlock)
            x = blk.norm1(x + blk.tmoe(x))
            sm = blk.smoe
            z = F.gelu(sm.proj_in(sm.norm(x)))
            z1, z2 = z.chunk(2, dim=-1)
            z2 = sm.norm_z2(z2)
            if sm.router is None:
                s, st = deterministic(z2, state, rows, sm.weight, sm.bias)
            else:
                s, st = partial(z2, state, rows, sm.weight, sm.bias, sm.router)
            x = blk.norm2(x + sm.proj_out(z1 * s))
        new_states.append(st)
    return m.lm_head(m.norm_f(x)), new_states


class DecodeStep(nn.Module):
    """``(input_ids [B, S] int64, position [] int64, *states [B, n, c]) -> (logits [B, S, V], *new_states)``.

    Shares the parameters of ``model`` (no copy). Eval mode: token MoE runs ``torch.ops.smlp.token_moe``
    exactly as the full forward does. No input checks here (it is traced); ``step`` checks.
    """

    def __init__(self, model: SMLPForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, *states: torch.Tensor):
        m = self.model
        S = input_ids.shape[1]
        rows = position.reshape(()) + torch.arange(S, device=input_ids.device)
        logits, new_states = run_blocks(m, m.embed(input_ids), states, rows, dense_spatial_step,
                                        deterministic_smoe_step, partial_smoe_step)
        return (logits, *new_states)


def check_step_inputs(model: SMLPForCausalLM, input_ids: torch.Tensor, position: int,
                      states: Sequence[torch.Tensor], *, dtype: torch.dtype | None = None) -> None:
    """One clear ``InputError`` for anything a step cannot take (also used by the ORT runtime).

    Checks: ids [B, S] integer in the vocabulary; 0 <= position, position + S <= max_seq_len;
    one state per block of shape [B, max_seq_len, c] and the expected dtype; partial-prediction
    models need the first step to cover the p routing rows.
    """
    cfg = model.config
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise InputError(f"input_ids must be [batch, new_tokens] with new_tokens >= 1, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    B, S = input_ids.shape
    check_position(cfg, position, S)
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise InputError(f"token id {hi if hi >= cfg.vocab_size else lo} outside the vocabulary [0, {cfg.vocab_size})")
    names = state_names(model)
    if len(states) != len(names):
        raise InputError(f"expected {len(names)} state tensors (one per block), got {len(states)}")
    want = state_shape(model, B)
    for name, st in zip(names, states):
        if tuple(st.shape) != want:
            raise InputError(f"{name} has shape {tuple(st.shape)}, expected {want} [batch, max_seq_len, c]")
        if dtype is not None and st.dtype != dtype:
            raise InputError(f"{name} has dtype {st.dtype}, expected {dtype}")


def check_position(cfg, position: int, S: int) -> None:
    """Range rules shared by every backend (see ``check_step_inputs``)."""
    import numbers

    if isinstance(position, bool) or not isinstance(position, numbers.Integral):
        raise InputError(f"position must be an int, got {type(position).__name__}")
    position = int(position)
    if position < 0:
        raise InputError(f"position must be >= 0, got {position}")
    if position + S > cfg.max_seq_len:
        raise InputError(f"position {position} + {S} new token(s) = {position + S} exceeds max_seq_len {cfg.max_seq_len}")
    p = cfg.prefix_len
    if p and position + S < p:
        raise InputError(
            f"partial-prediction model: spatial routing is fixed from the first p = {p} tokens, so the "
            f"prompt (first step) needs at least {p} tokens; got {position + S}. Use a longer prompt "
            f"(incremental decoding cannot re-route earlier positions)")


def step(model: SMLPForCausalLM, input_ids: torch.Tensor, position: int,
         states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run S new tokens at positions ``[position, position + S)``.

    input_ids [B, S] int64; position int; states: ``init_states`` layout (one [B, n, c] per block,
    the model's dtype). Returns (logits [B, S, V] in the model's dtype, new states). Prefill
    (S > 1) and decode (S = 1) are the same call. The logits equal ``model(ids[:, :position + S])``
    at those positions (up to float summation order). Inputs are not modified.
    """
    p = next(model.parameters())
    check_step_inputs(model, input_ids, position, states, dtype=p.dtype)
    with torch.no_grad():
        out = DecodeStep(model)(input_ids.long(), torch.tensor(int(position), dtype=torch.long, device=p.device), *states)
    return out[0], list(out[1:])
