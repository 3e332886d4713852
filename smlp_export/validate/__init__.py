"""Numeric parity validation of exports against PyTorch (``smlp validate``, parity.json)."""
from __future__ import annotations

from .parity import run_validation  # noqa: F401
from .report import ParityReport  # noqa: F401
from .tolerances import TOLERANCES, Tolerance, tolerance_for  # noqa: F401
