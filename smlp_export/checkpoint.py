"""Checkpoints: a directory with ``config.json``, ``model.safetensors``, ``smlp_tokenizer.json`` and
``metadata.json`` (format version, sha256 of the weights, training record). Checkpoints written
before the tokenizer file was renamed (``tokenizer.json``) still load. The first two files follow
the Hugging Face ``PyTorchModelHubMixin`` layout (see ``smlp_export.hub``).

Loading validates everything before the model is built, and each problem is one
``CheckpointError`` naming the file, tensor or field. Saving is atomic: the files go to a temporary
sibling directory that is renamed into place, so an interrupted save never leaves a directory that
looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .config import SMLPConfig
from .artifacts import DEFAULT_CHECKPOINT, export_hint, is_export_dir
from .errors import CheckpointError, ConfigError
from .fsutil import sha256_file
from .tokenizer import ByteTokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Not "tokenizer.json": Hugging Face tools read that name as a `tokenizers` JSON, which this is not.
TOKENIZER_FILE = "smlp_tokenizer.json"
LEGACY_TOKENIZER_FILE = "tokenizer.json"  # read, never written
METADATA_FILE = "metadata.json"
DEFAULT_NAME = DEFAULT_CHECKPOINT
FLOAT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def default_checkpoint_dir() -> Path:
    """The embedded default checkpoint shipped inside the package."""
    return Path(__file__).resolve().parent / "default_model"


def resolve(path_or_name: str | os.PathLike | None) -> Path:
    if path_or_name is None or str(path_or_name) == DEFAULT_NAME:
        return default_checkpoint_dir()
    return Path(path_or_name)


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def atomic_dir(target: Path, overwrite: bool = False, inputs: tuple = ()):
    """Context manager: yields a temp dir next to ``target``; renames it into place on success.
    ``target`` is checked by ``fsutil.check_output`` (``inputs``: paths it must not replace)."""
    return _AtomicDir(target, overwrite, tuple(inputs))


class _AtomicDir:
    def __init__(self, target: Path, overwrite: bool, inputs: tuple = ()):
        if not str(target):  # Path("") is "." (the current directory): check_output refuses ""
            from .fsutil import check_output

            check_output(target, force=overwrite, error=CheckpointError)
        self.target, self.overwrite, self.inputs = Path(target), overwrite, inputs

    def __enter__(self) -> Path:
        from .fsutil import check_output, clean_stale, temp_dir_for

        # an existing target only with overwrite, and only an empty folder or one smlp wrote
        check_output(self.target, force=self.overwrite, inputs=self.inputs, error=CheckpointError)
        clean_stale(self.target)  # leftovers of writers that were killed
        self.tmp = temp_dir_for(self.target)  # umask permissions, not mkdtemp's 0700
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        from .fsutil import publish_dir

        try:
            if exc_type is None:  # without overwrite, fails if target appeared meanwhile
                publish_dir(self.tmp, self.target, overwrite=self.overwrite)
        except FileExistsError:
            raise CheckpointError(f"{self.target} already exists: another writer created it meanwhile "
                                  "(use --force to overwrite)") from None
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)  # gone already after a successful publish
        return False


def save_checkpoint(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer: ByteTokenizer | None = None,
    metadata: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    inputs: tuple = (),
) -> Path:
    """Write ``model`` (an ``SMLPForCausalLM``) as a checkpoint directory, atomically.
    ``overwrite`` replaces only an empty folder or one smlp wrote, never one of ``inputs``
    (``fsutil.check_output``)."""
    from safetensors.torch import save_file

    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"unsupported checkpoint dtype {dtype}")
    cfg: SMLPConfig = model.config
    tok = tokenizer or getattr(model, "tokenizer", None) or ByteTokenizer(cfg.vocab_size, cfg.eos_token_id)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if not str(directory):
        from .fsutil import check_output

        check_output(directory, force=overwrite, error=CheckpointError)
    target = Path(directory)
    with atomic_dir(target, overwrite, inputs) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        from .fsutil import set_default_mode

        set_default_mode(tmp / WEIGHTS_FILE)  # safetensors writes 0600 whatever the umask
        write_sidecars(tmp, cfg, tok, metadata, dtype, sha256_file(tmp / WEIGHTS_FILE),
                       sum(v.numel() for v in state.values()))
    return target


def write_sidecars(tmp: Path, cfg: SMLPConfig, tok: ByteTokenizer, metadata: dict[str, Any] | None,
                   dtype: torch.dtype, weights_sha256: str, num_parameters: int) -> None:
    """config.json, the tokenizer and metadata.json beside a ``model.safetensors`` already in ``tmp``."""
    (tmp / CONFIG_FILE).write_text(cfg.to_json() + "\n")
    (tmp / TOKENIZER_FILE).write_text(tok.to_json() + "\n")
    meta = dict(metadata or {})
    meta.update(format_version=FORMAT_VERSION, dtype=FLOAT_DTYPES[dtype], weights_sha256=weights_sha256,
                num_parameters=num_parameters)
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def init_checkpoint(cfg: SMLPConfig, directory: str | os.PathLike, *, seed: int, dtype: torch.dtype,
                    metadata: dict | None = None, overwrite: bool = False,
                    progress: Callable[[int], None] | None = None) -> Path:
    """A random-init checkpoint directory of ``cfg``, written atomically (``atomic_dir``) without
    building the model (streamed: ``init_weights.write_random_init``): the same files ``save_checkpoint(SMLPForCausalLM(cfg))`` writes
    under ``torch.manual_seed(seed)``. Refuses (CheckpointError, nothing written) when the disk
    lacks room for the weights."""
    from .fsutil import set_default_mode
    from .init_weights import file_bytes, write_random_init
    from .memory import num_parameters

    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"unsupported checkpoint dtype {dtype}")
    from .fsutil import check_output

    target = check_output(directory, force=overwrite, error=CheckpointError)  # "" / a user folder: refused first
    need = file_bytes(cfg, dtype)
    probe = next((p for p in (target, *target.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if need > free:
        raise CheckpointError(f"{target}: the weights need {need / 1e9:.1f} GB of disk but only "
                              f"{free / 1e9:.1f} GB is free there")
    with atomic_dir(target, overwrite) as tmp:
        sha = write_random_init(cfg, tmp / WEIGHTS_FILE, seed=seed, dtype=dtype, progress=progress)
        set_default_mode(tmp / WEIGHTS_FILE)
        write_sidecars(tmp, cfg, ByteTokenizer(cfg.vocab_size, cfg.eos_token_id), metadata, dtype, sha,
                       num_parameters(cfg))
    return target


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: missing {path.name}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # json recurses once per level: "[[[[...]]]]" 100000 deep
        raise CheckpointError(f"{path}: not a checkpoint file (JSON nested too deeply to read)") from None


def read_config(path_or_name: str | os.PathLike | None = None) -> SMLPConfig:
    d = resolve(path_or_name)
    try:
        return SMLPConfig.from_dict(_read_json(d / CONFIG_FILE))
    except ConfigError as e:
        raise CheckpointError(f"{d / CONFIG_FILE}: {e}") from None


def read_metadata(path_or_name: str | os.PathLike | None = None) -> dict[str, Any]:
    return _read_json(resolve(path_or_name) / METADATA_FILE)


def _expected_state(cfg: SMLPConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes by arithmetic (``shapes.state_shapes``): no module is built before the
    header has been checked against them."""
    from .shapes import state_shapes

    return state_shapes(cfg)


# safetensors header dtype names of the float dtypes a checkpoint may hold
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _torch_name(st_dtype: str) -> str:
    """'I32' -> 'torch.int32' (the names users know), else the header's own name."""
    names = {"F64": "float64", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
             "BOOL": "bool"}
    return f"torch.{names[st_dtype]}" if st_dtype in names else st_dtype


def check_structure(wpath: Path, cfg: SMLPConfig) -> None:
    """Names, shapes and dtypes of the safetensors file against ``cfg``, from its header alone (no
    tensor data read): one CheckpointError naming the first defect or the truncation."""
    from safetensors import safe_open

    if not wpath.is_file():
        raise CheckpointError(f"{wpath.parent}: missing {wpath.name}")
    expected = _expected_state(cfg)
    try:
        with safe_open(str(wpath), framework="pt") as f:
            keys = set(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{wpath}: corrupt or truncated safetensors file ({e})") from None
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing:
        raise CheckpointError(f"{wpath}: missing tensor {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{wpath}: unexpected tensor {unexpected[0]}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for k in sorted(keys):
        if shapes[k] != expected[k]:
            raise CheckpointError(f"{wpath}: tensor {k} has shape {list(shapes[k])} but config.json "
                                  f"implies {list(expected[k])} (config does not match the weights)")
        if dtypes[k] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{wpath}: tensor {k} has dtype {_torch_name(dtypes[k])}; expected a float dtype")
    if len(set(dtypes.values())) > 1:
        raise CheckpointError(f"{wpath}: mixed dtypes "
                              f"{sorted(SAFETENSORS_DTYPES[v] for v in set(dtypes.values()))}")


def _load_tensors(wpath: Path, cfg: SMLPConfig) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    check_structure(wpath, cfg)  # structure first: names the tensor or the truncation
    try:
        with safe_open(str(wpath), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in sorted(f.keys())}
    except Exception as e:  # a header that parses over a truncated body
        raise CheckpointError(f"{wpath}: corrupt or truncated safetensors file ({e})") from None
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise CheckpointError(f"{wpath}: tensor {k} contains NaN or Inf")
    return tensors


def _model_from_tensors(cfg: SMLPConfig, tensors: dict[str, torch.Tensor], model_cls: type) -> torch.nn.Module:
    """The model built around the loaded tensors themselves, in the checkpoint's dtype.

    Built on the meta device (nothing allocated, no random init) and then given the tensors
    (``assign=True``): a fp16/bf16 checkpoint is never inflated to float32. A half checkpoint
    becomes a mixed-precision model (``smlp_export.precision``: LayerNorms and token-router
    centroids cast up to float32, < 0.1 % of the weights at d=1024), the form that is exported."""
    from .precision import TORCH_TO_NAME, to_compute_dtype

    with torch.device("meta"):
        model = model_cls(cfg)
    model.load_state_dict(tensors, strict=True, assign=True)
    dtype = next(iter(tensors.values())).dtype
    if dtype != torch.float32:
        to_compute_dtype(model, TORCH_TO_NAME[dtype])
    return model


def refuse_export_dir(d: Path) -> None:
    """An export folder given where a checkpoint is needed: say so, instead of "missing metadata.json"."""
    if is_export_dir(d):
        raise CheckpointError(f"{d} is an export directory, not a checkpoint: {export_hint(d)}")


def read_header(d: Path, *, memory_op: str, what: str, dtype: str | None = None):
    """Everything a checkpoint directory says before its weights are read: (metadata, config,
    tokenizer), checked (not an export folder, format version, config, tokenizer agreeing with the
    config) and the memory check for ``memory_op`` (``memory.require``) done. Shared by
    :func:`load_checkpoint` and the low-memory export (``export.weights.open_checkpoint``)."""
    refuse_export_dir(d)
    meta = _read_json(d / METADATA_FILE)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{d / METADATA_FILE}: unknown checkpoint format_version {got!r} "
                              f"(this version reads {FORMAT_VERSION})")
    cfg = read_config(d)
    from .memory import require

    kw = {} if dtype is None else {"dtype": dtype}
    require(cfg, memory_op, checkpoint_dtype=str(meta.get("dtype", "float32")), what=what, **kw)
    tpath = tokenizer_path(d)
    tok = _read_tokenizer(tpath)
    if tok.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{tpath}: vocab_size {tok.vocab_size} != config vocab_size {cfg.vocab_size}")
    if tok.eos_token_id != cfg.eos_token_id:
        # generation stops on the tokenizer's eos, training/validation use the config's: they must agree
        raise CheckpointError(f"{tpath}: eos_token_id {tok.eos_token_id} != config eos_token_id {cfg.eos_token_id}")
    return meta, cfg, tok


def load_model(path_or_name: str | os.PathLike | None, model_cls: type, *, allow_pickle: bool = False
               ) -> torch.nn.Module:
    """Load a checkpoint directory (or ``"default"``/None for the embedded model) as ``model_cls``
    (``SMLPForCausalLM`` or a subclass: this layer sits below model.py and never names it), in eval mode.

    The returned model carries ``.tokenizer`` and ``.checkpoint_info``
    (path, metadata, weights sha256). A pickled ``.pt`` file is refused unless ``allow_pickle`` is
    set, and then read with ``torch.load(weights_only=True)``. The model's dtype is the
    checkpoint's (fp16 / bf16 checkpoints load as mixed-precision half models, not inflated).
    """
    d = resolve(path_or_name)
    if d.is_file() and d.suffix in (".pt", ".pth", ".bin"):
        return _load_pickle(d, allow_pickle, model_cls)
    if not d.exists():
        raise CheckpointError(f"checkpoint {d} does not exist")
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} is not a directory (expected config.json + model.safetensors)")
    meta, cfg, tok = read_header(d, memory_op="load", what=f"loading {d}")
    wpath = d / WEIGHTS_FILE
    tensors = _load_tensors(wpath, cfg)  # structure first: names the tensor or the truncation
    digest = sha256_file(wpath)
    if meta.get("weights_sha256") not in (None, digest):
        raise CheckpointError(f"{wpath}: sha256 does not match metadata.json (file corrupt or replaced)")
    model = _model_from_tensors(cfg, tensors, model_cls)
    model.eval()
    model.tokenizer = tok
    model.checkpoint_info = {"path": str(d), "metadata": meta, "weights_sha256": digest}
    return model


def _load_pickle(path: Path, allow_pickle: bool, model_cls: type) -> torch.nn.Module:
    if not allow_pickle:
        raise CheckpointError(f"{path}: pickled checkpoints are refused (they can run code); "
                              "pass --allow-pickle to load it with torch.load(weights_only=True)")
    from .safe_load import load_weights_only

    obj = load_weights_only(path)  # one line, never torch's advice to retry with weights_only=False
    if not isinstance(obj, dict) or "config" not in obj or "state_dict" not in obj:
        raise CheckpointError(f"{path}: expected a dict with 'config' and 'state_dict'")
    try:
        cfg = SMLPConfig.from_dict(obj["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    expected = _expected_state(cfg)
    sd = obj["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(sd).__name__}, expected a dict of tensors")
    for k, shape in expected.items():
        if k not in sd:
            raise CheckpointError(f"{path}: missing tensor {k}")
        if not isinstance(sd[k], torch.Tensor) or sd[k].dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: {k} is not a float tensor")
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{path}: tensor {k} has shape {list(sd[k].shape)}, expected {list(shape)}")
        if not torch.isfinite(sd[k]).all():
            raise CheckpointError(f"{path}: tensor {k} contains NaN or Inf")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]}")
    model = model_cls(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    model.eval()
    model.tokenizer = ByteTokenizer(cfg.vocab_size, cfg.eos_token_id)
    model.checkpoint_info = {"path": str(path), "metadata": {}, "weights_sha256": sha256_file(path)}
    return model


def stored_dtype(checkpoint: Any) -> str:
    """"fp32" | "fp16" | "bf16": what a checkpoint holds (an export's default ``--dtype``): an
    in-memory model's bulk weights, else the safetensors header of the directory's weights (no
    tensor read). Anything unreadable (missing, pickled, corrupt) gives "fp32" and is reported by
    the loader that follows."""
    from .precision import TORCH_TO_NAME, compute_dtype_name

    if hasattr(checkpoint, "embed") and hasattr(checkpoint, "config"):
        return compute_dtype_name(checkpoint)
    wpath = resolve(checkpoint) / WEIGHTS_FILE
    try:
        from safetensors import safe_open

        with safe_open(str(wpath), framework="pt") as f:
            first = next(iter(f.keys()), None)
            st = f.get_slice(first).get_dtype() if first is not None else "F32"
    except Exception:  # the loader names the defect
        return "fp32"
    name = SAFETENSORS_DTYPES.get(st, "float32")
    return TORCH_TO_NAME[getattr(torch, name)]


def load_mixin_dir(d: Path, model_cls: type) -> torch.nn.Module:
    """``config.json`` + ``model.safetensors`` without ``metadata.json``: what ``PyTorchModelHubMixin``
    writes. The same structural checks as ``load_checkpoint`` (names, shapes, dtypes, finiteness)."""
    cfg = read_config(d)
    tpath = tokenizer_path(d)
    tok = _read_tokenizer(tpath) if tpath.exists() else ByteTokenizer(cfg.vocab_size, cfg.eos_token_id)
    if tok.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{tpath}: vocab_size {tok.vocab_size} != config vocab_size {cfg.vocab_size}")
    tensors = _load_tensors(d / WEIGHTS_FILE, cfg)
    model = model_cls(cfg)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    model.eval()
    model.tokenizer = tok
    model.checkpoint_info = {"path": str(d), "metadata": {}, "weights_sha256": sha256_file(d / WEIGHTS_FILE)}
    return model


def tokenizer_path(d: Path) -> Path:
    """``smlp_tokenizer.json``, or the legacy ``tokenizer.json`` of older checkpoints if only that exists."""
    if not (d / TOKENIZER_FILE).is_file() and (d / LEGACY_TOKENIZER_FILE).is_file():
        return d / LEGACY_TOKENIZER_FILE
    return d / TOKENIZER_FILE


def _read_tokenizer(path: Path) -> ByteTokenizer:
    try:
        return ByteTokenizer.from_dict(_read_json(path))
    except CheckpointError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def load_tokenizer(path_or_name: str | os.PathLike | None = None) -> ByteTokenizer:
    return _read_tokenizer(tokenizer_path(resolve(path_or_name)))
