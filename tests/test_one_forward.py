"""One block forward: the decode steps run the model's own block modules (``SMLPForCausalLM.run_blocks``
with a ``SpatialStep`` per block), so the full forward and incremental decoding cannot drift.

Two guards: every block / tMoE / sMoE module of the model runs in each decode step (a private
re-implementation of the blocks would not fire their hooks), and every block's OUTPUT -- not only the
logits -- equals the full forward's at the same positions, for every routing mode and both step forms
(one position for the batch: ``state.step``; one position per row: ``sequence.step_rows``).
"""
from __future__ import annotations

import pytest
import torch

from smlp_export.decode.sequence import step_rows
from smlp_export.decode.state import CarriedState, init_states, step
from smlp_export.model import SparseBlock

from .conftest import ROUTING_MODES, mixing_model

ATOL_FP64 = 1e-12  # summation order only (the step sums over all n state rows, zeros included)


def _ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 257, (B, T), generator=torch.Generator().manual_seed(seed))


def _block_outputs(m, run) -> dict[int, list[torch.Tensor]]:
    """Run ``run()`` with a hook on every block; block index -> its outputs, one per call."""
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(m.blocks))}
    hooks = [blk.register_forward_hook(lambda _m, _a, out, i=i: got[i].append(out.detach().clone()))
             for i, blk in enumerate(m.blocks)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return got


def _scalar_steps(m, x, chunks):
    states, pos = init_states(m, x.shape[0]), 0
    for S in chunks:
        _, states = step(m, x[:, pos:pos + S], pos, states)
        pos += S


def _row_steps(m, x, chunks):
    """The per-row form (rows [B, S], start flags on the first step); every row at the same place
    here (different positions per row: tests/test_sequence.py)."""
    states, pos = init_states(m, x.shape[0]), [0] * x.shape[0]
    for S in chunks:
        _, new_pos, states = step_rows(m, x[:, pos[0]:pos[0] + S], pos, states, start=[pos[0] == 0] * x.shape[0])
        pos = new_pos.tolist()


@pytest.mark.parametrize("mode", sorted(ROUTING_MODES))
def test_every_block_output_of_the_steps_equals_the_full_forward(mode):
    m = mixing_model(**ROUTING_MODES[mode]).double()
    p = m.config.prefix_len
    x = _ids(2, max(p, 3) + 5, seed=7)
    chunks = [max(p, 3), 3, 1, 1]  # prefill, a multi-token chunk, decode steps
    full = _block_outputs(m, lambda: m(x))
    for form, run in (("scalar", _scalar_steps), ("per-row", _row_steps)):
        stepped = _block_outputs(m, lambda: run(m, x, chunks))
        for i in range(len(m.blocks)):
            assert len(stepped[i]) == len(chunks), f"{form}: block {i} ran {len(stepped[i])} times for {len(chunks)} steps"
            torch.testing.assert_close(torch.cat(stepped[i], 1), full[i][0], rtol=0, atol=ATOL_FP64,
                                       msg=lambda s, i=i, f=form: f"{f} step, blocks.{i} ({type(m.blocks[i]).__name__}): {s}")


@pytest.mark.parametrize("form", ["scalar", "per-row"])
def test_the_steps_run_the_models_own_modules_with_a_spatial_step(form):
    m = mixing_model(**ROUTING_MODES["topk2-partial"])
    p = m.config.prefix_len
    calls: list[tuple[str, object]] = []
    mods = {f"blocks.{i}": blk for i, blk in enumerate(m.blocks)}
    mods.update({f"blocks.{i}.{k}": getattr(blk, k) for i, blk in enumerate(m.blocks)
                 if isinstance(blk, SparseBlock) for k in ("tmoe", "smoe")})
    hooks = [mod.register_forward_pre_hook(lambda _m, args, k=k: calls.append((k, args[3] if len(args) > 3 else None)))
             for k, mod in mods.items()]
    x = _ids(1, p + 1, seed=2)
    try:
        (_scalar_steps if form == "scalar" else _row_steps)(m, x, [p, 1])
    finally:
        for h in hooks:
            h.remove()
    assert sorted({k for k, _ in calls}) == sorted(mods), "a block module did not run in the decode step"
    assert all(len([c for c in calls if c[0] == k]) == 2 for k in mods)  # once per step
    # blocks and sMoE get the carried-state strategy; tMoE is per token (no spatial step)
    assert all(isinstance(s, CarriedState) for k, s in calls if not k.endswith(".tmoe")), calls
