"""Deployment: turn an export directory into what a serving runtime loads."""
from __future__ import annotations

from .triton import write_triton_repository  # noqa: F401
