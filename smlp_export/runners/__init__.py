"""Pluggable backends: see ``base.Runner``."""
from __future__ import annotations

from .base import Runner, RunnerUnavailable  # noqa: F401
