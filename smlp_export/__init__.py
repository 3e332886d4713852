"""smlp-export: sparse all-MLP (sMLP) language models -> verified ONNX / TensorRT engines.

Public API: ``SMLPConfig``, ``SMLPForCausalLM``, ``load_checkpoint``, ``save_checkpoint``,
``ByteTokenizer``. Importing the package registers the ``torch.ops.smlp.*`` custom ops.
"""
from __future__ import annotations

from . import ops  # noqa: F401  (registers torch.ops.smlp.*)
from .checkpoint import load_tokenizer, read_config, save_checkpoint
from .config import SMLPConfig, preset
from .errors import CheckpointError, ConfigError, InputError, SMLPError
from .model import SMLPForCausalLM, load_checkpoint
from .tokenizer import ByteTokenizer

__version__ = "0.1.0"

__all__ = [
    "ByteTokenizer", "CheckpointError", "ConfigError", "InputError", "SMLPConfig", "SMLPError",
    "SMLPForCausalLM", "load_checkpoint", "load_tokenizer", "preset", "read_config", "save_checkpoint",
]
