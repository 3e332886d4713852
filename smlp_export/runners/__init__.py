"""Pluggable backends: see ``base.Runner``; ``get_runner(name, ...)`` builds one by checked name."""
from __future__ import annotations

from .base import Runner, RunnerUnavailable  # noqa: F401
from .registry import get_runner, register_runner, runner_names  # noqa: F401
