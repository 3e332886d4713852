"""The Hugging Face layout: ``SMLPForCausalLM.save_pretrained(dir)`` / ``from_pretrained(dir)``, offline.

A checkpoint directory is already what ``huggingface_hub``'s ``PyTorchModelHubMixin`` reads and writes:
``config.json`` (the ``SMLPConfig`` dataclass as a flat JSON object, the mixin's encoding of a dataclass
``config`` argument) and ``model.safetensors`` (the module's state dict under its own names). Next to
them lie ``smlp_tokenizer.json`` and ``metadata.json``, which the mixin ignores. So

- a directory written here loads with any ``PyTorchModelHubMixin`` subclass of ``SMLPForCausalLM``
  whose ``__init__`` takes ``config: SMLPConfig`` (tests/test_hub.py does exactly that), and
- a directory written by such a subclass (``config.json`` + ``model.safetensors`` + a model card, no
  metadata) loads here with the same checks as any checkpoint, and the tokenizer the config implies.

``huggingface_hub`` itself is not needed (and nothing is downloaded: fetch a Hub repository first, e.g.
with ``huggingface_hub.snapshot_download``, and pass the local directory).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def save_pretrained(model: torch.nn.Module, save_directory: str | os.PathLike, *, overwrite: bool = False,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a checkpoint directory (atomically; the whole directory is replaced only with
    ``overwrite=True``). The metadata of the checkpoint it was loaded from is carried over."""
    from .checkpoint import save_checkpoint

    if metadata is None:
        metadata = dict((getattr(model, "checkpoint_info", None) or {}).get("metadata") or {})
    return save_checkpoint(model, save_directory, metadata=metadata, overwrite=overwrite)


def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, *, model_cls: type, allow_pickle: bool = False,
                    **hub_kwargs: Any) -> torch.nn.Module:
    """Load a local checkpoint directory (ours, or one written by ``PyTorchModelHubMixin``) as
    ``model_cls`` (the class whose ``from_pretrained`` was called), in eval mode.

    ``hub_kwargs`` that only concern downloading (``local_files_only``, ``revision``, ``cache_dir``,
    ``force_download``, ``token``) are accepted and ignored; ``map_location`` moves the model."""
    from .checkpoint import DEFAULT_NAME, METADATA_FILE, load_mixin_dir, load_model, refuse_export_dir, resolve

    map_location = hub_kwargs.pop("map_location", "cpu")
    unknown = sorted(set(hub_kwargs) - {"local_files_only", "revision", "cache_dir", "force_download", "token",
                                        "strict"})
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword argument(s) {', '.join(unknown)}")
    name = str(pretrained_model_name_or_path)
    d = resolve(pretrained_model_name_or_path)
    if name != DEFAULT_NAME and not d.exists():
        raise CheckpointError(f"{name} is not a local checkpoint directory (from_pretrained is offline: download a "
                              "Hub repository first, e.g. huggingface_hub.snapshot_download, and pass its path)")
    refuse_export_dir(d)
    if d.is_dir() and not (d / METADATA_FILE).exists():
        model = load_mixin_dir(d, model_cls)
    else:
        model = load_model(d, model_cls, allow_pickle=allow_pickle)
    return model.to(map_location)
