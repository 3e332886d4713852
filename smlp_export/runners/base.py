"""The runner interface shared by the validator and the benchmark (Polygraphy-style).

A runner wraps one backend (PyTorch eager, torch.compile, ONNX Runtime with an export, the ONNX
reference evaluator, TensorRT later). The validator compares any runner against PyTorch; the
benchmark times any runner. A new backend is one new file subclassing ``Runner``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class RunnerUnavailable(Exception):
    """Raised by ``Runner.check_available`` / ``load`` with the reason a backend cannot run here."""


class Runner(ABC):
    #: short backend name used in reports and on the CLI, e.g. "torch", "ort", "reference"
    name: str = "runner"

    @classmethod
    def check_available(cls) -> None:
        """Raise ``RunnerUnavailable(reason)`` if this backend cannot run on this machine."""

    @abstractmethod
    def load(self) -> None:
        """Build the session / model. Called once before ``run``."""

    @abstractmethod
    def run(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """input_ids [B, T] int64 -> outputs by name: ``logits`` [B, T, V] plus routing outputs
        (``router.blocks.{i}.tmoe`` [B, T, E_t], ``router.blocks.{i}.smoe`` [B, c, E_s])."""

    def metadata(self) -> dict[str, Any]:
        """Backend facts for reports: versions, providers, thread settings, dtype."""
        return {"backend": self.name}

    def close(self) -> None:
        """Release the session / model."""

    def __enter__(self) -> "Runner":
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
