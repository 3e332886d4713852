"""The one place that creates ONNX Runtime sessions: every runner, validator, decoder, benchmark and
server-side check calls :func:`create_session` (tests/test_ort_session.py scans the sources for any
other ``InferenceSession``).

ONNX Runtime silently falls back to the CPU provider when CUDA (or TensorRT) is requested but cannot
run (no GPU, missing CUDA libraries): a figure labelled "CUDA" would then be a CPU figure. So every
requested provider must be in this build's ``get_available_providers()`` before the session is made,
and in ``session.get_providers()`` after; otherwise ``RunnerUnavailable`` names the provider.

The exception: the model files copied verbatim into Triton model repositories
(``smlp_export/deploy/full_model.py``, ``python_sequence_model.py``, ``triton_generate.py`` and the
``PYTHON_MODEL`` text in ``deploy/triton.py``) run inside tritonserver, where smlp_export is not
installed, so they create their sessions themselves.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .base import RunnerUnavailable

CPU = "CPUExecutionProvider"
# Providers listed by onnxruntime-gpu even on a machine without a GPU (they fall back at session time).
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
OPTIMIZATION_LEVELS = ("none", "basic", "extended", "all")
# ORT's config key for the folder of external initializers when the model comes as bytes (a model
# loaded from a path finds them next to the file).
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
DISABLE_PREPACKING = "session.disable_prepacking"
# A session over a model too large to copy (external-data weights: validation, unreached-expert
# sub-graphs). Each entry keeps ONNX Runtime from holding a second copy of the weights:
# - prepacking: a packed copy of every MatMul weight;
# - constant folding: the ort target's expert loop slices ``Gather(w, constant e)``, which ORT folds
#   into one new initializer per expert at load, i.e. a full anonymous copy of every tMoE layer beside
#   the memory-mapped original that the fused MoE branch reads (measured on a 1.17 GB fp16 model:
#   120 s and +1.1 GB at load with folding, 1.5 s and +0 without). Folding is exact (the folded
#   value is the kernel's own output), so results are bit-identical; only time and memory differ.
# - the CPU arena: it keeps the largest transient (the fp16 MoE kernel's float copy of a layer's
#   experts) for the session's lifetime instead of returning it.
LARGE_MODEL_OPTIONS = {"prepacking": False, "constant_folding": False, "cpu_arena": False}


def _ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RunnerUnavailable(f"onnxruntime is not installed ({e})") from None
    return ort


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def check_provider(provider: str) -> None:
    """Raise ``RunnerUnavailable`` unless ``provider`` can really run here, without building a
    session (a benchmark checks before it exports): in this onnxruntime build, and for the CUDA /
    TensorRT providers a visible CUDA device."""
    have = available_providers()
    if provider not in have:
        raise RunnerUnavailable(f"{provider} is not in this onnxruntime build (has {', '.join(have)})")
    if provider in GPU_PROVIDERS:
        try:
            import torch

            has_gpu = torch.cuda.is_available()
        except ImportError:
            has_gpu = Path("/dev/nvidia0").exists()
        if not has_gpu:
            raise RunnerUnavailable(f"{provider} needs a CUDA GPU; none is visible")


def _threads(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 4096:
        raise ValueError(f"{name} must be an integer in 0..4096 (0: onnxruntime's default), got {value!r}")
    return value


def session_options(*, intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                    sequential: bool = False, graph_optimization: str = "all", prepacking: bool = True,
                    cpu_arena: bool = True, optimized_model_path: str | os.PathLike | None = None,
                    profile_prefix: str | None = None, external_data_dir: str | os.PathLike | None = None,
                    config: Mapping[str, str] | None = None, log_severity: int = 3) -> Any:
    """An ``onnxruntime.SessionOptions``. Threads: None keeps onnxruntime's default.
    ``sequential``: ORT_SEQUENTIAL execution (a chain graph gains nothing from parallel branches).
    ``prepacking=False``: no second, prepacked copy of every weight (large models).
    ``cpu_arena=False``: freed buffers go back to the system (large models, ``LARGE_MODEL_OPTIONS``).
    ``optimized_model_path``: ORT writes the graph it will run there (what its optimizers made).
    ``profile_prefix``: enable ORT's profiler, trace written on ``session.end_profiling()``.
    ``config``: further session config entries, applied in sorted order.
    ``log_severity`` 3 (errors): the CUDA-fallback warning is replaced by :func:`create_session`'s check."""
    ort = _ort()
    if graph_optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"graph_optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {graph_optimization!r}")
    so = ort.SessionOptions()
    intra, inter = _threads("intra_op_threads", intra_op_threads), _threads("inter_op_threads", inter_op_threads)
    if intra is not None:
        so.intra_op_num_threads = intra
    if inter is not None:
        so.inter_op_num_threads = inter
    if sequential:
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_optimization]
    so.log_severity_level = log_severity
    so.enable_cpu_mem_arena = bool(cpu_arena)
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    entries = dict(config or {})
    if not prepacking:
        entries[DISABLE_PREPACKING] = "1"
    if external_data_dir is not None:
        entries[EXTERNAL_DATA_FOLDER] = str(external_data_dir)
    for k, v in sorted(entries.items()):
        so.add_session_config_entry(k, v)
    return so


def create_session(model: str | os.PathLike | bytes, *, providers: Sequence[str] | None = None,
                   constant_folding: bool = True, **options: Any) -> Any:
    """An ``onnxruntime.InferenceSession`` over ``model`` (a .onnx path, or serialized bytes; for
    bytes with external weights pass ``external_data_dir``). ``providers``: in priority order
    (default CPU only); each must be in this build and still be in ``session.get_providers()`` once
    the session exists (no silent fallback). ``constant_folding=False``: ORT's ConstantFolding
    transformer is skipped (``LARGE_MODEL_OPTIONS``). ``options``: :func:`session_options`.
    A model onnxruntime cannot load raises ``SMLPError`` naming the file (one line)."""
    ort = _ort()
    providers = list(providers or [CPU])
    have = ort.get_available_providers()
    missing = [p for p in providers if p not in have]
    if missing:
        raise RunnerUnavailable(f"{', '.join(missing)} not in this onnxruntime build (has {', '.join(have)})")
    so = session_options(**options)
    what = "the in-memory model" if isinstance(model, (bytes, bytearray)) else str(model)
    try:
        session = ort.InferenceSession(model if isinstance(model, (bytes, bytearray)) else str(model), so,
                                       providers=providers,
                                       **({} if constant_folding else {"disabled_optimizers": ["ConstantFolding"]}))
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types (Fail, InvalidGraph, ...)
        from smlp_export.errors import SMLPError

        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SMLPError(f"onnxruntime cannot load {what}: {first}") from None
    got = session.get_providers()
    dropped = [p for p in providers if p not in got]
    if dropped:
        raise RunnerUnavailable(f"onnxruntime fell back from {', '.join(dropped)} to {', '.join(got)} "
                                f"(requested {', '.join(providers)})")
    return session
