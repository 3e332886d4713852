"""Triton ``config.pbtxt`` files built as Triton's own ``inference.ModelConfig`` protobuf.

Every config the deploy writes is a ``tritonclient.grpc.model_config_pb2.ModelConfig`` message,
serialized with ``google.protobuf.text_format`` and parsed back before it is written, so a field
Triton does not know cannot be written at all. tritonclient is optional (the ``serve`` extra, or
``pip install 'tritonclient[grpc]'``): it is imported here, lazily, and its absence is one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..errors import SMLPError

# Limits of what a config may hold: ModelConfig's batch sizes, counts and dims are int32 fields, and
# Triton / ONNX Runtime use them as int32 sizes; instances and threads are processes / OS threads, so
# anything past a few hundred is a typo, not a machine.
INT32_MAX = 2**31 - 1
MAX_INSTANCES = 1024
MAX_THREADS = 1024  # ONNX Runtime intra-op threads per instance (runners.ort_session.MAX_THREADS)
MAX_IDLE_US = 3_600_000_000  # an hour: a sequence idle longer than that is abandoned


def check_range(flag: str, value: int, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi], or one SMLPError naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SMLPError(f"{flag} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def pb() -> Any:
    """tritonclient's ``model_config_pb2`` module (one clear SMLPError when it is missing)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise SMLPError("writing Triton configs needs tritonclient: pip install 'tritonclient[grpc]' "
                        "(or the package's 'serve' extra)") from None
    return model_config_pb2


def parse_config(text: str, *, optional: bool = False) -> Any:
    """``config.pbtxt`` text -> ``inference.ModelConfig`` through Triton's own schema; a misspelled or
    misplaced field raises SMLPError with the parser's line and column.
    ``optional``: return None when tritonclient is not installed."""
    try:
        mc = pb()
    except SMLPError:
        if optional:
            return None
        raise
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as e:
        raise SMLPError(f"config.pbtxt does not parse as Triton's ModelConfig: {e}") from None


def config_text(cfg: Any) -> str:
    """``cfg`` as config.pbtxt text, checked by parsing it back into an equal message."""
    from google.protobuf import text_format

    text = text_format.MessageToString(cfg)
    if parse_config(text) != cfg:  # pragma: no cover - text_format round-trips every valid message
        raise SMLPError(f"config of {cfg.name} does not survive text_format round trip")
    return text


def write_config(model_dir: Path, cfg: Any) -> None:
    (Path(model_dir) / "config.pbtxt").write_text(config_text(cfg))


def new_config(name: str, *, backend: str, max_batch_size: int) -> Any:
    cfg = pb().ModelConfig(name=name, backend=backend, max_batch_size=max_batch_size)
    return cfg


def add_tensor(field: Any, name: str, data_type: str, dims: Iterable[int], **extra: Any) -> Any:
    """Append a ModelInput / ModelOutput to ``field`` (``cfg.input`` / ``cfg.output``)."""
    t = field.add(name=name, data_type=pb().DataType.Value(data_type), dims=list(dims))
    for k, v in extra.items():
        setattr(t, k, v)
    return t


def add_instances(cfg: Any, count: int, kind: str) -> None:
    group = pb().ModelInstanceGroup
    cfg.instance_group.add(count=count, kind=group.Kind.Value(kind))


def set_parameters(cfg: Any, params: dict[str, Any]) -> None:
    for k, v in params.items():
        cfg.parameters[k].string_value = str(v)
