"""Latency benchmarking: the timing method (``timing``), machine description (``machine``),
backends (``backends``), the sweep (``sweep``), outputs (``report``) and ORT profiles (``profile``)."""
from __future__ import annotations

from .machine import describe_machine  # noqa: F401
from .timing import LatencyStats, TimingConfig, measure  # noqa: F401
