"""The parity report written to ``parity.json`` (format below; keys documented in docs/validation.md)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import PARITY_FILE
from ..fsutil import set_default_mode

REPORT_FORMAT = 1


@dataclass
class ParityReport:
    """Outcome of one validation run: ``passed`` is True only if every check in ``checks`` passed."""

    passed: bool
    backend: str  # runtime: "ort" | "reference"
    target: str  # export target from the manifest: "ort" | "tensorrt" | "portable"
    dtype: str  # export dtype: "fp32" | "fp16"
    tolerances: dict[str, Any]
    metrics: dict[str, Any]
    checks: list[dict[str, Any]]  # [{name, value, limit, ok}]
    failures: list[str]  # one line per failed check
    cases: list[dict[str, Any]]  # one row per (batch, seq) case
    checkpoint: dict[str, Any]  # path, weights_sha256, verified
    model: dict[str, Any]  # path, sha256 of model.onnx
    backend_metadata: dict[str, Any]
    reference: dict[str, Any]  # the PyTorch side: versions, threads
    corpus: dict[str, Any]
    time_s: float
    quick: bool = False
    decode: dict[str, Any] | None = None  # decode.onnx parity when the export has one (see decode/validate.py)
    coverage: dict[str, Any] | None = None  # experts reached per MoE layer (validate/coverage.py)
    tolerance_overrides: dict[str, Any] | None = None  # --atol/--rtol (validate/overrides.py); looser: bool
    bisect: dict[str, Any] | None = None  # --bisect: per-block comparison, first divergence (validate/bisect.py)
    # --save-inputs/--save-outputs: {cases, rtol, atol: {output: bound}} for `polygraphy run` (polygraphy_io.py)
    polygraphy: dict[str, Any] | None = None
    format_version: int = REPORT_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2, sort_keys=False, allow_nan=False, default=_jsonable)

    def write(self, export_dir: str | os.PathLike, dir_fd: int | None = None) -> Path:
        """Write ``export_dir/parity.json`` atomically (temp file in the same folder, then rename).

        ``dir_fd``: the export folder opened when validation began. The file then goes into that
        very folder, and if ``export_dir`` names another one by now (``smlp export --force``
        replaced it meanwhile) nothing is written there and ``SMLPError`` says so: a report on
        the old model must never land in the new export."""
        target = Path(export_dir) / PARITY_FILE
        text = self.to_json() + "\n"
        if dir_fd is not None:
            return _write_in(dir_fd, Path(export_dir), text)
        fd, tmp = tempfile.mkstemp(prefix=".parity.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            set_default_mode(tmp)  # mkstemp made it 0600
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target


def _same_dir(dir_fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(dir_fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _write_in(dir_fd: int, export_dir: Path, text: str) -> Path:
    from ..errors import SMLPError
    from ..fsutil import file_mode, show_path

    replaced = SMLPError(f"{show_path(export_dir)} was replaced while it was being validated (another "
                         f"`smlp export --force`?): {PARITY_FILE} not written; validate the new export")
    if not _same_dir(dir_fd, export_dir):
        raise replaced
    tmp = f".parity.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode(), dir_fd=dir_fd)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, PARITY_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileNotFoundError:  # the folder was removed (replaced and cleaned up) meanwhile
        raise replaced from None
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    if not _same_dir(dir_fd, export_dir):  # replaced between the check and the rename: it went to the old one
        raise replaced
    return export_dir / PARITY_FILE


def _jsonable(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite(o: Any) -> Any:
    """NaN / inf (a broken backend) become the strings "nan" / "inf": JSON has no such numbers."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o
