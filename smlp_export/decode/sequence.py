"""The decode step with one position *per batch row*, for Triton's sequence batcher (PyTorch twin).

``state.step`` takes one scalar position for the whole batch: every row is at the same place in its
sequence (one generation call). Triton's sequence batcher with implicit state (``oldest`` strategy)
batches requests of *different* sequences into one execution, so each row of a batch sits at its own
position, and the position itself must travel as (implicit) state. This module is the same step
with

- ``position`` int64 [B, 1]: absolute position of row b's first new token;
- ``start`` int32 [B, 1]: Triton's CONTROL_SEQUENCE_START (1 on a sequence's first request); a
  starting row is taken at position 0 whatever ``position`` holds (its state rows must be zeros:
  Triton's ``initial_state { zero_data: true }``);
- outputs ``logits`` [B, S, V], ``new_position`` = position + S [B, 1] (the next request's
  position state) and the new spatial states.

Per block, row b's new z2 rows are written at rows ``[pos_b, pos_b + S)`` of its own state (one
ScatterND with per-row indices) and its spatial output is ``where(u <= t, W[t, u], 0) @ state_b``
for ``t = pos_b + i`` (W rows gathered per batch row). Routing is as in ``state``: token MoE per
token, deterministic sMoE static, partial-prediction sMoE from state rows ``[0, p)``, so each row's
first step must cover ``[0, p)`` (``step_rows`` refuses otherwise; the ONNX graph cannot check).
Rows are independent: the result for row b equals ``state.step`` of that row alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import InputError
from ..model import SMLPForCausalLM
from ..sampling import check_ids, check_position, check_states, check_vocab
from .state import StepOps, partial_route, run_step, state_names, state_shape


def _rows_of(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """weight [..., n, m], rows [B, S] int64 -> weight[..., rows[b, i], :] of shape [..., B, S, m] (one Gather)."""
    B, S = rows.shape
    w = weight.index_select(-2, rows.reshape(-1))
    return w.reshape(*weight.shape[:-2], B, S, weight.shape[-1])


def _masked_rows(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """weight [..., n, n], rows [B, S] -> ``where(u <= rows[b, i], W[..., rows[b, i], u], 0)`` [..., B, S, n]."""
    n = weight.shape[-1]
    w = _rows_of(weight, rows)
    keep = torch.arange(n, device=rows.device)[None, None, :] <= rows[:, :, None]  # [B, S, n]
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


def _bias_rows(bias: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """bias [..., n], rows [B, S] -> bias[..., rows] of shape [..., B, S]."""
    return _rows_of(bias[..., None], rows)[..., 0]


def _update(state: torch.Tensor, rows: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """state [B, n, c] with row rows[b, i] of batch row b replaced by z2[b, i] (out of place).

    ``index_put`` with explicit (batch, row) index pairs: ONE ``ScatterND(state, indices[B, S, 2],
    z2)`` on the state's own layout, as in ``state._update`` (here the rows differ per batch row)."""
    B, S = rows.shape
    b = torch.arange(B, device=z2.device)[:, None].expand(B, S)
    return state.index_put((b, rows), z2)


def dense_spatial_rows(z2, state, rows, weight, bias):
    """gMLP spatial projection. z2 [B, S, c]; state [B, n, c]; rows [B, S]; weight [n, n]; bias [n]."""
    new = _update(state, rows, z2)
    s = torch.matmul(_masked_rows(weight, rows), new) + _bias_rows(bias, rows)[..., None]  # [B, S, c]
    return s, new


def deterministic_smoe_rows(z2, state, rows, weight, bias):
    """Deterministic sMoE: channel chunk e uses expert e. weight [E, n, n]; bias [E, n]."""
    B, S, c = z2.shape
    E, n = weight.shape[0], weight.shape[-1]
    new = _update(state, rows, z2)
    w = _masked_rows(weight, rows)  # [E, B, S, n]
    chunks = new.reshape(B, n, E, c // E).permute(2, 0, 1, 3)  # [E, B, n, cs]
    y = torch.matmul(w, chunks) + _bias_rows(bias, rows)[..., None]  # [E, B, S, cs]
    return y.permute(1, 2, 0, 3).reshape(B, S, c), new


def partial_smoe_rows(z2, state, rows, weight, bias, router):
    """Partial-prediction sMoE: routing per (row, channel) from state rows [0, p) (router [p, E])."""
    B, S, c = z2.shape
    new = _update(state, rows, z2)
    gate, expert = partial_route(new, router, z2.dtype)  # [B, c]
    w = _masked_rows(weight, rows).transpose(0, 1)  # [B, E, S, n]
    y = torch.matmul(w, new[:, None]) + _bias_rows(bias, rows).transpose(0, 1)[..., None]  # [B, E, S, c]
    idx = expert[:, None, None, :].expand(B, 1, S, c)
    y = y.gather(1, idx).squeeze(1)
    return y * gate[:, None, :], new


#: one position per batch row: rows [B, S]
PER_ROW = StepOps(dense_spatial_rows, deterministic_smoe_rows, partial_smoe_rows)


class SequenceStep(nn.Module):
    """``(input_ids [B, S], position [B, 1] int64, start [B, 1] int32, *states [B, n, c]) ->
    (logits [B, S, V], new_position [B, 1], *new_states)``. Shares ``model``'s parameters; no checks
    (it is traced); ``step_rows`` checks."""

    def __init__(self, model: SMLPForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position, start, *states):
        m = self.model
        S = input_ids.shape[1]
        pos = torch.where(start != 0, torch.zeros_like(position), position)  # [B, 1]
        rows = pos + torch.arange(S, device=input_ids.device)[None, :]  # [B, S]
        logits, new_states = run_step(m, input_ids, states, rows, PER_ROW)
        return (logits, pos + S, *new_states)


def step_rows(model: SMLPForCausalLM, input_ids: torch.Tensor, positions: Sequence[int] | np.ndarray | torch.Tensor,
              states: Sequence[torch.Tensor], start: Sequence[bool] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Run S new tokens per row, row b at positions ``[positions[b], positions[b] + S)``.

    input_ids [B, S]; positions: B ints; states: one [B, n, c] per block (model dtype); start: B
    flags (a starting row is at position 0 and must come with zero state rows). Returns (logits
    [B, S, V], new positions [B] int64, new states). Checked per row like ``state.step`` (range,
    vocabulary, the partial-prediction first-step rule). Inputs are not modified.
    """
    cfg = model.config
    p = next(model.parameters())
    B, S = check_ids(input_ids, vocab_size=cfg.vocab_size, values=False, error=InputError)
    pos = [int(x) for x in (positions.tolist() if hasattr(positions, "tolist") else positions)]
    flags = [bool(x) for x in (start if start is not None else [False] * B)]
    if len(pos) != B or len(flags) != B:
        raise InputError(f"need one position and one start flag per batch row ({B}), got {len(pos)} and {len(flags)}")
    for b in range(B):
        check_position(0 if flags[b] else pos[b], S, max_seq_len=cfg.max_seq_len,
                       min_prompt_tokens=max(1, cfg.prefix_len), error=InputError)
    check_vocab(input_ids, cfg.vocab_size, InputError)
    check_states(states, names=state_names(model), shape=state_shape(model, B), dtype=p.dtype, error=InputError)
    position = torch.tensor(pos, dtype=torch.long, device=p.device)[:, None]
    st = torch.tensor(flags, dtype=torch.int32, device=p.device)[:, None]
    with torch.no_grad():
        out = SequenceStep(model)(input_ids.long(), position, st, *states)
    return out[0], out[1][:, 0], list(out[2:])
