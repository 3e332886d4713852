"""A float32 PyTorch reference that never holds the model: weights are read per module call.

Validation used to hold the checkpoint twice at once (the float32 PyTorch model and the ONNX
Runtime session): 3.3x the weight bytes at 372 M parameters, an OOM kill at 3.5 B. Here the
reference is ``SMLPForCausalLM`` on the meta device; a forward pre-hook on every module that owns
parameters (embedding, LayerNorms, Linears, the tMoE / sMoE / spatial layers) reads that module's
tensors from the checkpoint (``export.weights.open_checkpoint``'s source: plain reads of each
tensor's byte range, no mapping), casts them to float32, and the post-hook puts the meta tensors
back. The token experts are the exception: they stay in the checkpoint's dtype and
``ops.grouped_expert_ffn`` widens one expert at a time (same values), so a sparse block's tMoE call
holds its 2 x E x f_t x d weights at the file's width, not float32. The reference adds at most that
one module to the session's 1x.

The values are those of ``load_checkpoint(path).float()`` exactly (each tensor cast alone); every
forward reads the weights again from the page cache, the price of the memory bound.

``RowCache`` wraps a reference runner: the validator's searches run many windows in one batch and
then replay the few they pick as cases; rows are independent in eval mode (routing is per token /
per sequence), so a picked row's outputs are taken from the scan instead of another full pass.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def streamed_reference(path: Any):
    """A meta ``SMLPForCausalLM`` of the checkpoint at ``path`` whose modules load their float32
    weights for the length of each call (``checkpoint_info`` / ``tokenizer`` as ``load_checkpoint``
    gives them; every header and sha256 check of ``open_checkpoint`` done)."""
    import torch

    from smlp_export.export.weights import open_checkpoint

    model = open_checkpoint(path, memory_op="export")
    source = getattr(model, "weight_source", None)
    if source is None:  # a pickled checkpoint is loaded whole by open_checkpoint
        return model.float().eval()
    for prefix, mod in model.named_modules():
        own = [n for n, p in mod.named_parameters(recurse=False) if p is not None]
        if own:
            _attach(mod, prefix, own, source, torch)
    model.streamed = True
    return model.eval()


def _attach(mod, prefix: str, names: list[str], source, torch) -> None:
    metas = {n: getattr(mod, n) for n in names}

    # The token experts stay in their storage dtype: ops.grouped_expert_ffn widens one expert at a
    # time (the same float32 values), so a tMoE call holds E x 2 x f x d half values, not float32 ones.
    narrow = {"w1", "b1", "w2", "b2"} if type(mod).__name__ == "TokenMoE" else set()

    def load(m, args):
        for n in names:
            key = f"{prefix}.{n}" if prefix else n
            t = source.get(key)
            m._parameters[n] = torch.nn.Parameter(t if n in narrow else t.float(), requires_grad=False)

    def unload(m, args, out):
        for n in names:
            m._parameters[n] = metas[n]

    mod.register_forward_pre_hook(load)
    mod.register_forward_hook(unload)


class RowCache:
    """A runner whose ``run`` answers from earlier batches when it has seen every row before.

    Outputs are split per row (axis 0) on the way in; ``max_bytes`` bounds what is kept (rows past
    it are simply not cached). ``runs`` counts the calls that reached the wrapped runner."""

    def __init__(self, runner, max_bytes: int = 256 * 1024**2) -> None:
        self.runner, self.max_bytes = runner, max_bytes
        self.rows: dict[bytes, dict[str, np.ndarray]] = {}
        self.bytes = 0
        self.runs = 0

    @staticmethod
    def _key(row: np.ndarray) -> bytes:
        return np.asarray(row, dtype=np.int64).tobytes() + len(row).to_bytes(4, "little")

    def run(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        keys = [self._key(r) for r in ids]
        if keys and all(k in self.rows for k in keys):
            return {name: np.stack([self.rows[k][name] for k in keys]) for name in self.rows[keys[0]]}
        out = self.runner.run(ids)
        self.runs += 1
        for b, k in enumerate(keys):
            if k in self.rows:
                continue
            row = {name: np.array(v[b]) for name, v in out.items()}
            size = sum(v.nbytes for v in row.values())
            if self.bytes + size <= self.max_bytes:
                self.rows[k] = row
                self.bytes += size
        return out

    def __getattr__(self, name: str) -> Any:  # load / metadata / close of the wrapped runner
        return getattr(self.runner, name)
