"""``smlp validate --atol/--rtol``: user bounds instead of the dtype's table, never silently.

``rtol`` replaces the table's ``max_abs_err_rel`` (the logits error bound relative to the logits'
scale; also the bisect rows' bound). ``atol`` adds an absolute allowance: a case passes when
``max|diff| <= atol + rtol * scale`` (Polygraphy's ``atol + rtol * |ref|``, with the scale of the
case in place of each element's magnitude). The routing tie noise, top-1 and perplexity bounds
stay the table's. A bound looser than the table's (rtol above it, or any atol > 0) is recorded as
``looser: true`` in parity.json ``tolerance_overrides`` and printed in the summary.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from smlp_export.errors import InputError

from .tolerances import Tolerance


def apply_overrides(tol: Tolerance, atol: float | None, rtol: float | None) -> tuple[Tolerance, dict[str, Any] | None]:
    """(the tolerance to use, the parity.json ``tolerance_overrides`` entry or None)."""
    if atol is None and rtol is None:
        return tol, None
    for name, v in (("--atol", atol), ("--rtol", rtol)):
        if v is not None and (not math.isfinite(v) or v < 0):
            raise InputError(f"{name} must be a finite number >= 0, got {v}")
    new_rtol = tol.max_abs_err_rel if rtol is None else float(rtol)
    new_atol = 0.0 if atol is None else float(atol)
    looser_parts = []
    if new_rtol > tol.max_abs_err_rel:
        looser_parts.append(f"rtol {new_rtol:g} > the {tol.dtype} table's {tol.max_abs_err_rel:g}")
    if new_atol > 0:
        looser_parts.append(f"atol {new_atol:g} added (the table has none)")
    entry = {"atol": new_atol, "rtol": new_rtol, "table": {"atol": 0.0, "rtol": tol.max_abs_err_rel, "dtype": tol.dtype},
             "looser": bool(looser_parts),
             "note": ("looser than the table: " + "; ".join(looser_parts)) if looser_parts
             else "at most as loose as the table"}
    return dataclasses.replace(tol, max_abs_err_rel=new_rtol, atol=new_atol), entry


def logits_bound_ok(rows: list[dict[str, Any]], tol: Tolerance) -> bool:
    """Every case within ``atol + rtol * scale`` (the check used when atol > 0)."""
    return all(r["max_abs_err"] <= tol.atol + tol.max_abs_err_rel * r["logits_scale"] for r in rows)
