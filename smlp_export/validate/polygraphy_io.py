"""Validation inputs and PyTorch's golden outputs in Polygraphy's JSON formats.

``--save-inputs F.json``: a list of feed dicts ``[{"input_ids": int64 [B, T]}, ...]`` (one per
validation case), what ``polygraphy run --load-inputs`` reads. ``--save-outputs G.json``: a
Polygraphy ``RunResults`` with one runner (``pytorch-fp32``) and one ``IterationResult`` per case
holding ``logits`` and every router output, what ``--load-outputs`` compares against. Both are
written with Polygraphy's own ``save_json`` (imported lazily: only these flags need polygraphy),
to a temporary name then renamed, with the umask's ordinary file mode.

Polygraphy's default check (element-wise, fails where ``|diff| > atol`` and ``|diff| > rtol·|ref|``,
both 1e-5) is scale-blind: the default model's logits and token-router logits reach ~20, where
fp32 summation order alone (ONNX Runtime's MatMul vs PyTorch's) moves them by 1-4e-5 (a few ulps
of the largest value), so a correct export fails it. ``polygraphy_tolerances`` turns the dtype
table into per-output absolute bounds (``--rtol 0 --atol NAME:BOUND ...``):

- ``logits``: the table's logits bound, ``atol + max_abs_err_rel · scale``, at the smallest case
  scale (so a case Polygraphy passes also passes ``smlp validate``'s logits check);
- token-router logits (``router.blocks.N.tmoe``): the tie noise ``tie_ulps · eps · scale`` at the
  layer's smallest case scale: an error below it cannot flip a decision outside a tie;
- channel-router probabilities (``router.blocks.N.smoe``): the noise at scale 1.

Each bound is rounded down to 3 significant digits, never up. ``polygraphy_command`` writes the
command line, which ``smlp validate`` prints once both files are written.
"""
from __future__ import annotations

import math
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from smlp_export.errors import InputError, SMLPError

RUNNER_NAME = "pytorch-fp32"


def _round_down(x: float, digits: int = 3) -> float:
    if x <= 0 or not math.isfinite(x):
        return 0.0
    e = math.floor(math.log10(x)) - digits + 1
    return float(f"{math.floor(x / 10.0 ** e)}e{e}")  # exact decimal, no 0.0012200000000000002


def polygraphy_tolerances(results: list[dict[str, np.ndarray]], tol: Any,
                          router_kinds: dict[str, str]) -> dict[str, float]:
    """Per-output absolute bounds (see the module doc) from the PyTorch outputs of every case.

    results: one dict per case, output name -> float32 array (``logits`` [B, T, V], router outputs
    as in ``router_kinds``: name -> "tmoe_logits" | "smoe_probs"). tol: the ``Tolerance`` in use
    (after --atol/--rtol overrides)."""
    bounds: dict[str, float] = {}
    for res in results:
        for name, ref in res.items():
            if not ref.size:
                continue
            scale = float(np.abs(ref).max())
            if name == "logits":
                b = tol.atol + tol.max_abs_err_rel * scale
            elif router_kinds.get(name) == "smoe_probs":
                b = tol.noise(1.0)
            elif name in router_kinds:
                b = tol.noise(scale)
            else:
                continue
            bounds[name] = min(bounds.get(name, math.inf), b)
    return {k: _round_down(v) for k, v in bounds.items()}


def polygraphy_command(model_path: str | os.PathLike, inputs_path: str | os.PathLike,
                       outputs_path: str | os.PathLike, atol: dict[str, float],
                       providers: list[str] | None = None) -> str:
    """The ``polygraphy run`` line that replays the comparison with the table's tolerances."""
    args = ["polygraphy", "run", os.fspath(model_path), "--onnxrt"]
    if providers:
        args += ["--providers", *providers]
    args += ["--load-inputs", os.fspath(inputs_path), "--load-outputs", os.fspath(outputs_path), "--rtol", "0",
             "--atol", *[f"{k}:{v:.3g}" for k, v in atol.items()]]
    return shlex.join(args)


def check_save_paths(export_dir: str | os.PathLike, inputs_path: str | None, outputs_path: str | None) -> None:
    """Refuse, before validation runs, paths that cannot be written or must not be: the same file
    twice, anything inside the export folder (its graph, manifest or parity.json), a directory,
    or a path whose parent is a file or not writable. Also needs polygraphy importable."""
    from smlp_export.fsutil import show_path

    paths = [(flag, p) for flag, p in (("--save-inputs", inputs_path), ("--save-outputs", outputs_path)) if p is not None]
    if not paths:
        return
    try:
        import polygraphy.json  # noqa: F401
    except ImportError as e:
        raise SMLPError(f"--save-inputs/--save-outputs need the polygraphy package ({e}); "
                        "pip install polygraphy") from None
    export_real = Path(export_dir).resolve()
    seen: dict[Path, str] = {}
    for flag, p in paths:
        if not p:
            raise InputError(f"{flag}: the path is empty")
        real = Path(p).resolve()
        if real in seen:
            raise InputError(f"{flag} {show_path(p)} is the same file as {seen[real]}: give each its own path")
        seen[real] = flag
        if real == export_real or export_real in real.parents:
            raise InputError(f"{flag} {show_path(p)} is inside the export {show_path(export_dir)}: it would "
                             "overwrite or add to the export's files; write it elsewhere")
        if real.is_dir():
            raise InputError(f"{flag} {show_path(p)} is a directory; give a file name (e.g. {show_path(Path(p) / 'x.json')})")
        parent = real.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise InputError(f"{flag} {show_path(p)}: {show_path(parent)} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {show_path(p)}: {show_path(parent)} is not writable")


def _atomic_save(obj, path: str | os.PathLike) -> None:
    from polygraphy.json import save_json

    from smlp_export.fsutil import set_default_mode

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_json(obj, tmp)
        set_default_mode(tmp)  # mkstemp made it 0600; the user's umask decides, as for any file
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_polygraphy(model, inputs: list[tuple[str, np.ndarray]], inputs_path: str | None,
                    outputs_path: str | None, input_name: str = "input_ids") -> list[dict[str, np.ndarray]] | None:
    """Write the feeds (``inputs``: [(case, input_ids int64 [B, T])]) and/or the float32 PyTorch
    outputs of ``model`` on them; returns those outputs (one dict per case) when written."""
    try:
        from polygraphy.comparator import IterationResult, RunResults
    except ImportError as e:
        raise SMLPError(f"--save-inputs/--save-outputs need the polygraphy package ({e}); "
                        "pip install polygraphy") from None
    from smlp_export.runners.torch_runner import TorchRunner

    feeds = [{input_name: np.ascontiguousarray(ids, dtype=np.int64)} for _, ids in inputs]
    if inputs_path:
        _atomic_save(feeds, inputs_path)
    if not outputs_path:
        return None
    runner = TorchRunner(model)
    runner.load()
    outs = [runner.run(f[input_name]) for f in feeds]
    results = RunResults()
    results.append((RUNNER_NAME, [IterationResult(o, runner_name=RUNNER_NAME) for o in outs]))
    _atomic_save(results, outputs_path)
    return outs
