"""Validation inputs and PyTorch's golden outputs in Polygraphy's JSON formats.

``--save-inputs F.json``: a list of feed dicts ``[{"input_ids": int64 [B, T]}, ...]`` (one per
validation case), what ``polygraphy run --load-inputs`` reads. ``--save-outputs G.json``: a
Polygraphy ``RunResults`` with one runner (``pytorch-fp32``) and one ``IterationResult`` per case
holding ``logits`` and every router output, what ``--load-outputs`` compares against. Both are
written with Polygraphy's own ``save_json`` (imported lazily: only these flags need polygraphy),
to a temporary name then renamed. Then::

    polygraphy run OUT/model.onnx --onnxrt --load-inputs F.json --load-outputs G.json

reproduces the comparison (Polygraphy's default tolerances are elementwise atol/rtol 1e-5: right
for fp32 exports; pass ``--atol/--rtol`` for fp16/bf16 ones).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from smlp_export.errors import SMLPError

RUNNER_NAME = "pytorch-fp32"


def _atomic_save(obj, path: str | os.PathLike) -> None:
    from polygraphy.json import save_json

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_json(obj, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_polygraphy(model, inputs: list[tuple[str, np.ndarray]], inputs_path: str | None,
                    outputs_path: str | None, input_name: str = "input_ids") -> None:
    """Write the feeds (``inputs``: [(case, input_ids int64 [B, T])]) and/or the float32 PyTorch
    outputs of ``model`` on them."""
    try:
        from polygraphy.comparator import IterationResult, RunResults
    except ImportError as e:
        raise SMLPError(f"--save-inputs/--save-outputs need the polygraphy package ({e}); "
                        "pip install polygraphy") from None
    from smlp_export.runners.torch_runner import TorchRunner

    feeds = [{input_name: np.ascontiguousarray(ids, dtype=np.int64)} for _, ids in inputs]
    if inputs_path:
        _atomic_save(feeds, inputs_path)
    if outputs_path:
        runner = TorchRunner(model)
        runner.load()
        results = RunResults()
        results.append((RUNNER_NAME, [IterationResult(runner.run(f[input_name]), runner_name=RUNNER_NAME)
                                      for f in feeds]))
        _atomic_save(results, outputs_path)
