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

The blocks themselves are the model's own code (``SMLPForCausalLM.run_blocks``): this module only
supplies the spatial product of the new rows against each block's state, as a ``model.SpatialStep``
(``CarriedState``). The same ``DecodeStep`` module is traced for ``decode.onnx`` (see ``export.py``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn

from ..errors import InputError
from ..model import SMLPForCausalLM
from ..sampling import check_ids, check_position, check_states, check_vocab


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


class StepOps(NamedTuple):
    """The spatial products for one row form: ``(z2, state, rows, weight, bias[, router]) -> (s, new state)``."""

    dense: Callable
    deterministic: Callable
    partial: Callable


#: one position for the whole batch: rows [S]
SCALAR_ROWS = StepOps(dense_spatial_step, deterministic_smoe_step, partial_smoe_step)


class CarriedState:
    """A ``model.SpatialStep`` for one block: its spatial products for the new rows ``rows`` taken
    against its carried state [B, n, c] with ``ops`` (``SCALAR_ROWS`` or ``sequence.PER_ROW``);
    ``state`` holds the new state once the block ran."""

    def __init__(self, state: torch.Tensor, rows: torch.Tensor, ops: StepOps) -> None:
        self.state, self.rows, self.ops = state, rows, ops

    def dense(self, z2, weight, bias):
        s, self.state = self.ops.dense(z2, self.state, self.rows, weight, bias)
        return s

    def deterministic(self, z2, weight, bias):
        s, self.state = self.ops.deterministic(z2, self.state, self.rows, weight, bias)
        return s

    def partial(self, z2, weight, bias, router):
        s, self.state = self.ops.partial(z2, self.state, self.rows, weight, bias, router)
        return s


def run_step(m: SMLPForCausalLM, input_ids: torch.Tensor, states: Sequence[torch.Tensor], rows: torch.Tensor,
             ops: StepOps) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's own blocks (``SMLPForCausalLM.run_blocks``) over new tokens ``input_ids`` [B, S]
    at ``rows``, each block mixing with its state through ``ops``. Returns (logits [B, S, V], new states)."""
    steps = [CarriedState(st, rows, ops) for st in states]
    logits = m.run_blocks(m.embed(input_ids), None, steps)
    return logits, [st.state for st in steps]


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
        logits, new_states = run_step(m, input_ids, states, rows, SCALAR_ROWS)
        return (logits, *new_states)


def check_step_inputs(model: SMLPForCausalLM, input_ids: torch.Tensor, position: int,
                      states: Sequence[torch.Tensor], *, dtype: torch.dtype | None = None) -> None:
    """One clear ``InputError`` for anything a step cannot take (the checks of ``smlp_export.sampling``).

    Checks: ids [B, S] integer in the vocabulary; 0 <= position, position + S <= max_seq_len;
    one state per block of shape [B, max_seq_len, c] and the expected dtype; partial-prediction
    models need the first step to cover the p routing rows.
    """
    cfg = model.config
    B, S = check_ids(input_ids, vocab_size=cfg.vocab_size, values=False, error=InputError)
    check_position(position, S, max_seq_len=cfg.max_seq_len, min_prompt_tokens=max(1, cfg.prefix_len), error=InputError)
    check_vocab(input_ids, cfg.vocab_size, InputError)
    check_states(states, names=state_names(model), shape=state_shape(model, B), dtype=dtype, error=InputError)


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
