"""Low-memory weights for the exporter: trace without data, write each initializer once.

An export used to hold the checkpoint several times over (the loaded model, its deep copy, the
exporter's tensors, the serialized ``ModelProto``, the inliner's copy, the rewrites' NumPy arrays):
11x the weight bytes at 350 M parameters. Here nothing of a large weight exists in memory until
the file is written, and then one tensor at a time:

1. the model is traced on the ``meta`` device (shapes only; ``meta_twin``);
2. after the ONNX conversion each large initializer becomes a *placeholder*: a ``TensorProto``
   with its dims and element type, ``data_location = EXTERNAL`` and an ``external_data`` entry
   ``smlp.recipe`` (JSON) saying how to compute it from the checkpoint: the source tensor, the
   element type to cast to, then ``transpose`` / ``tril`` / ``slice`` steps. The exporter's
   folding of ``Transpose(weight)`` and ``optimize.py``'s pre-masked causal weights and split
   ``proj_in`` weights extend the recipe (``derive``) instead of computing arrays;
3. ``write_model`` computes each placeholder from the checkpoint (read one tensor at a time; a
   ``safe_open`` per read, so the file's pages are unmapped again and never pile up in the
   process) and streams it into ``model.onnx.data`` (external data, 4 KiB-aligned offsets so ONNX
   Runtime can map it) or, for a small model, into the ``.onnx`` file itself.

Small tensors (``<= SMALL_NUMEL`` elements) are real from the start: the exporter folds and
deduplicates them exactly as it does for an eager model, and they cost nothing.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import SMLPError

# Weights above this go to <graph>.data (written one tensor at a time, never all in memory);
# below it they are embedded in the .onnx (one file; at most 2x this in memory while saving).
EXTERNAL_DATA_THRESHOLD = 128 * 1024**2

RECIPE_KEY = "smlp.recipe"
LAZY_LOCATION = "smlp-lazy"
# The exporter deduplicates initializers of at most 1024 elements by content (onnx_ir's
# DeduplicateInitializersPass): those must hold real data, so "small" is at least that.
SMALL_NUMEL = 1024
ALIGN = 4096  # external data offsets: page-aligned, so ONNX Runtime may memory-map them


class WeightError(SMLPError):
    """A placeholder without recipe, or a recipe naming a tensor the source lacks."""


# ---------------------------------------------------------------------------------------------
# sources: where the checkpoint tensors come from
# ---------------------------------------------------------------------------------------------
class WeightSource(Protocol):
    """Named checkpoint tensors, read on demand (state-dict names of an SMLPForCausalLM)."""

    def keys(self) -> list[str]: ...

    def get(self, name: str) -> "Any":  # torch.Tensor, CPU, the checkpoint's own dtype
        ...


class SafetensorsSource:
    """Tensors of one ``model.safetensors`` file, each read when asked for.

    The header (names, dtypes, shapes, byte ranges) is parsed once; every read is a plain
    ``readinto`` of that tensor's byte range into a fresh tensor. No memory mapping: mapped file
    pages count as the process's RSS while mapped (a ``safe_open`` read of a 1 GB expert tensor
    added 1 GB of file RSS beside the 1 GB copy), and a read tensor owns its memory, freed with it.
    """

    _DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

    def __init__(self, path: str | os.PathLike) -> None:
        import json
        import struct

        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._entries = {k: (v["dtype"], tuple(v["shape"]), tuple(v["data_offsets"])) for k, v in header.items()}
        self._keys = sorted(self._entries)

    def keys(self) -> list[str]:
        return list(self._keys)

    def get(self, name: str):
        import torch

        st, shape, (lo, hi) = self._entries[name]
        if st not in self._DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {st}, not one of {', '.join(self._DTYPES)}")
        dtype = getattr(torch, self._DTYPES[st])
        out = torch.empty(shape, dtype=dtype)
        n = out.numel() * out.element_size()
        if hi - lo != n:
            raise ValueError(f"tensor {name!r}: {hi - lo} bytes in the file for shape {list(shape)} {st} ({n} expected)")
        if n:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            with open(self.path, "rb") as f:
                f.seek(self._base + lo)
                got = f.readinto(view)
            if got != n:
                raise ValueError(f"tensor {name!r}: file ends after {got} of its {n} bytes (truncated)")
        return out


class StateDictSource:
    """Tensors of a model in memory (no copy)."""

    def __init__(self, model) -> None:
        self._sd = {k: v.detach() for k, v in model.state_dict().items()}

    def keys(self) -> list[str]:
        return sorted(self._sd)

    def get(self, name: str):
        return self._sd[name].cpu()


def source_for(model) -> WeightSource:
    """The cheapest source of ``model``'s weights: its safetensors file when the model was loaded
    from a checkpoint directory and still holds those weights, else its own state dict."""
    return getattr(model, "weight_source", None) or StateDictSource(model)


def meta_twin(model):
    """An ``SMLPForCausalLM`` of the same config on the meta device (no data), carrying the
    original's ``tokenizer`` / ``checkpoint_info`` / ``weight_source``, in eval mode."""
    import torch

    from ..model import SMLPForCausalLM

    with torch.device("meta"):
        twin = SMLPForCausalLM(model.config)
    for attr in ("tokenizer", "checkpoint_info", "weight_source"):
        if hasattr(model, attr):
            setattr(twin, attr, getattr(model, attr))
    return twin.eval()


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """``ops`` applied in order to ``source`` cast to ``elem`` (an ONNX TensorProto data type)."""

    source: str
    elem: int
    ops: tuple[tuple[Any, ...], ...] = ()

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "elem": self.elem, "ops": [list(o) for o in self.ops]},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        d = json.loads(text)
        return cls(d["source"], int(d["elem"]), tuple(tuple(_untuple(x) for x in o) for o in d["ops"]))

    def then(self, *op: Any) -> "Recipe":
        return Recipe(self.source, self.elem, (*self.ops, tuple(op)))


def _untuple(x: Any) -> Any:
    return tuple(x) if isinstance(x, list) else x


def _apply_shape(dims: list[int], op: tuple[Any, ...]) -> list[int]:
    kind = op[0]
    if kind == "transpose":
        return [dims[p] for p in op[1]]
    if kind == "tril":
        return list(dims)
    if kind == "slice":
        _, axis, start, stop = op
        out = list(dims)
        out[axis] = stop - start
        return out
    raise WeightError(f"unknown recipe step {kind!r}")


def placeholder(name: str, dims: Iterable[int], recipe: Recipe) -> TensorProto:
    """A data-less initializer that ``write_model`` will compute from ``recipe``."""
    t = TensorProto()
    t.name = name
    t.data_type = recipe.elem
    t.dims.extend(int(d) for d in dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", LAZY_LOCATION), (RECIPE_KEY, recipe.to_json())):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def recipe_of(t: TensorProto) -> Recipe | None:
    """The recipe of a placeholder, None for an initializer that holds data."""
    if t.data_location != TensorProto.EXTERNAL:
        return None
    for e in t.external_data:
        if e.key == RECIPE_KEY:
            return Recipe.from_json(e.value)
    return None


def is_lazy(t: TensorProto) -> bool:
    return recipe_of(t) is not None


def derive(t: TensorProto, name: str, *op: Any) -> TensorProto:
    """A new initializer ``name`` = one step (``("transpose", perm)``, ``("tril",)``,
    ``("slice", axis, start, stop)``) applied to ``t``: a placeholder with a longer recipe if ``t``
    is one, else computed now with NumPy (small tensors)."""
    r = recipe_of(t)
    if r is not None:
        return placeholder(name, _apply_shape(list(t.dims), op), r.then(*op))
    out = numpy_helper.from_array(np.ascontiguousarray(_apply_numpy(numpy_helper.to_array(t), op)), name)
    return out


def _apply_numpy(a: np.ndarray, op: tuple[Any, ...]) -> np.ndarray:
    kind = op[0]
    if kind == "transpose":
        return np.transpose(a, op[1])
    if kind == "tril":
        return np.tril(a)
    if kind == "slice":
        _, axis, start, stop = op
        return np.take(a, np.arange(start, stop), axis=axis)
    raise WeightError(f"unknown recipe step {kind!r}")


def _apply_torch(x, op: tuple[Any, ...]):
    import torch

    kind = op[0]
    if kind == "transpose":
        return x.permute(*op[1])
    if kind == "tril":
        return torch.tril(x)
    if kind == "slice":
        _, axis, start, stop = op
        return x.narrow(axis, start, stop - start)
    raise WeightError(f"unknown recipe step {kind!r}")


def compute(recipe: Recipe, source: WeightSource):
    """The tensor a recipe describes (torch, contiguous), read from ``source``."""
    import torch

    try:
        x = source.get(recipe.source)
    except KeyError:
        raise WeightError(f"checkpoint has no tensor {recipe.source!r}") from None
    x = x.to(torch_dtype(recipe.elem))
    for op in recipe.ops:
        x = _apply_torch(x, op)
    return x.contiguous()


def torch_dtype(elem: int):
    import torch

    table = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
             TensorProto.BFLOAT16: torch.bfloat16, TensorProto.DOUBLE: torch.float64}
    if elem not in table:
        raise WeightError(f"unsupported weight element type {TensorProto.DataType.Name(elem)}")
    return table[elem]


def _raw_bytes(x) -> memoryview:
    import torch

    return memoryview(x.reshape(-1).view(torch.uint8).numpy())


# ---------------------------------------------------------------------------------------------
# graphs
# ---------------------------------------------------------------------------------------------
def _all_graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(a.g)
            for sg in a.graphs:
                yield from _all_graphs(sg)


def lazy_initializers(model: onnx.ModelProto) -> list[TensorProto]:
    return [t for g in _all_graphs(model.graph) for t in g.initializer if is_lazy(t)]


def lazy_bytes(model: onnx.ModelProto) -> int:
    """Bytes the placeholders will take once written."""
    total = 0
    for t in lazy_initializers(model):
        total += int(np.prod(list(t.dims), dtype=np.int64)) * _itemsize(t.data_type)
    return total


def _itemsize(elem: int) -> int:
    return int(onnx.helper.tensor_dtype_to_np_dtype(elem).itemsize) if elem != TensorProto.BFLOAT16 else 2


def materialize(model: onnx.ModelProto, source: WeightSource) -> onnx.ModelProto:
    """Fill every placeholder with its data in place (for callers that want an in-memory model)."""
    for t in lazy_initializers(model):
        r = recipe_of(t)
        data = bytes(_raw_bytes(compute(r, source)))
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
        t.raw_data = data
    return model


def write_model(model: onnx.ModelProto, path: str | os.PathLike, source: WeightSource, *,
                external: bool, data_name: str | None = None) -> list[str]:
    """Write ``model`` to ``path``, computing each placeholder from ``source`` one at a time.

    external: placeholders go to ``data_name`` (default ``<file name>.data``) beside ``path`` at
    4 KiB-aligned offsets, and ``path`` holds the graph only; else the data is embedded (small
    models). The order is the graph's, so the same inputs give the same bytes. Returns the names
    of the files written. ``model`` is modified (placeholders now point at the data file).
    """
    path = Path(path)
    lazy = lazy_initializers(model)
    if not external:
        materialize(model, source)
        path.write_bytes(model.SerializeToString())
        return [path.name]
    data_name = data_name or f"{path.name}.data"
    offset = 0
    with open(path.parent / data_name, "wb") as f:
        for t in lazy:
            r = recipe_of(t)
            x = compute(r, source)
            pad = (-offset) % ALIGN
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            view = _raw_bytes(x)
            f.write(view)
            length = view.nbytes
            del view, x
            del t.external_data[:]
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += length
    path.write_bytes(model.SerializeToString())
    return [path.name, data_name]


def save_graph(model: onnx.ModelProto, path: str | os.PathLike, source: WeightSource, *,
               full_check: bool = False) -> list[str]:
    """Write a traced graph with lazy weights to ``path`` atomically and check the written file;
    returns the file names written (the .onnx first, then ``<name>.data`` when the weights went
    beside it: past ``EXTERNAL_DATA_THRESHOLD`` bytes, one tensor at a time). Every graph of an
    export (model.onnx, decode.onnx, decode_seq.onnx) is written by this one function."""
    import shutil
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent))
    try:
        names = write_model(model, tmpdir / path.name, source, external=lazy_bytes(model) > EXTERNAL_DATA_THRESHOLD)
        # checked from the file: the in-memory graph holds placeholders, the file holds the data
        onnx.checker.check_model(str(tmpdir / path.name), full_check=full_check)
        for n in reversed(names):  # the .onnx last: a graph file that exists is complete
            os.replace(tmpdir / n, path.parent / n)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return names


# ---------------------------------------------------------------------------------------------
# the exporter's IR (onnx_ir), between conversion and optimisation
# ---------------------------------------------------------------------------------------------
def _source_key(qualified: str, keys: set[str]) -> str | None:
    """``model.blocks.0.norm.weight`` (a wrapper's parameter name) -> ``blocks.0.norm.weight``."""
    parts = qualified.split(".")
    for i in range(len(parts)):
        k = ".".join(parts[i:])
        if k in keys:
            return k
    return None


def lazify_ir(model, source: WeightSource) -> dict[str, Recipe]:
    """Give the meta-traced ``model`` (an ``onnx_ir.Model`` from ``torch.onnx.export(...,
    optimize=False)``) its weights: real data for small tensors, placeholders for large ones, and
    fold ``Transpose(placeholder)`` into the placeholder's recipe (what the exporter's constant
    folding does to a real weight). Returns {placeholder location: recipe}."""
    import onnx_ir as ir

    keys = set(source.keys())
    recipes: dict[str, Recipe] = {}
    g = model.graph

    def lazy(name: str, shape, dtype, recipe: Recipe) -> ir.ExternalTensor:
        loc = f"{LAZY_LOCATION}/{len(recipes)}"
        recipes[loc] = recipe
        # base_dir that cannot exist: any attempt to read a placeholder early fails loudly
        return ir.ExternalTensor(loc, None, None, dtype, shape=ir.Shape(shape), name=name,
                                 base_dir="/nonexistent-smlp-placeholder")

    for name, value in list(g.initializers.items()):
        t = value.const_value
        raw = getattr(t, "raw", None)
        if raw is None or not getattr(raw, "is_meta", False):
            continue  # a real constant the exporter made
        key = _source_key(name, keys)
        if key is None:
            raise WeightError(f"traced tensor {name} has no data and is not a checkpoint tensor")
        if raw.numel() <= SMALL_NUMEL:
            value.const_value = type(t)(source.get(key).to(raw.dtype).contiguous(), name=name)
        else:
            value.const_value = lazy(name, tuple(raw.shape), t.dtype, Recipe(key, int(t.dtype)))

    def recipe(v) -> Recipe | None:
        c = v.const_value if v is not None else None
        return recipes.get(str(c.location)) if isinstance(c, ir.ExternalTensor) else None

    for node in list(g):
        if (node.domain, node.op_type) not in (("", "Transpose"), ("ai.onnx", "Transpose")):
            continue
        src = node.inputs[0]
        r = recipe(src)
        if r is None or not src.is_initializer():
            continue
        perm_attr = node.attributes.get("perm")
        perm = list(perm_attr.value) if perm_attr is not None else list(range(len(src.shape)))[::-1]
        name = f"{src.name}.T" if perm == [1, 0] else f"{src.name}.T{''.join(map(str, perm))}"
        shape = [src.shape[p] for p in perm]
        if name in g.initializers:
            new = g.initializers[name]
        else:
            new = ir.Value(name=name, shape=ir.Shape(shape), type=src.type,
                           const_value=lazy(name, shape, src.const_value.dtype, r.then("transpose", tuple(perm))))
            g.register_initializer(new)
        node.outputs[0].replace_all_uses_with(new)
        g.remove(node, safe=True)
        if not src.uses():
            g.initializers.pop(src.name)
    return recipes


def should_fold(recipes: dict[str, Recipe]):
    """``should_fold`` for the onnxscript optimizer: never fold a node reading a placeholder."""
    import onnx_ir as ir

    def fn(node) -> bool | None:
        for v in node.inputs:
            c = v.const_value if v is not None else None
            if isinstance(c, ir.ExternalTensor) and str(c.location) in recipes:
                return False
        return None

    return fn


def finish_placeholders(proto: onnx.ModelProto, recipes: dict[str, Recipe]) -> None:
    """After ``serialize_model``: turn each serialized placeholder into a recipe-carrying one."""
    for g in _all_graphs(proto.graph):
        for t in g.initializer:
            if t.data_location != TensorProto.EXTERNAL:
                continue
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc not in recipes:
                raise WeightError(f"initializer {t.name} points at external data {loc!r} the export did not make")
            t.CopyFrom(placeholder(t.name, list(t.dims), recipes[loc]))


def to_ir(proto: onnx.ModelProto):
    """``proto`` as an ``onnx_ir.Model`` for the rewrite rules (``export/rewrites.py``); each
    placeholder becomes an ``ir.ExternalTensor`` whose location carries its recipe (``ir_recipe``,
    ``ir_derive``), so rules can move and derive weights without data. ``proto`` is consumed."""
    import onnx_ir as ir

    for g in _all_graphs(proto.graph):
        for t in g.initializer:
            r = recipe_of(t)
            if r is not None:
                del t.external_data[:]
                e = t.external_data.add()
                e.key, e.value = "location", f"{LAZY_LOCATION}/{r.to_json()}"
    return ir.serde.deserialize_model(proto)


def from_ir(model, value_info: set[str] | None = None) -> onnx.ModelProto:
    """The ``ModelProto`` of a ``to_ir`` model, its placeholders recipe-carrying again.
    ``value_info``: keep the top-level value_info of these node outputs only (onnx_ir writes one
    for every typed value, initializers included)."""
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    if value_info is not None:
        produced = {o for n in proto.graph.node for o in n.output}
        keep = [v for v in proto.graph.value_info if v.name in value_info and v.name in produced]
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(keep)
    prefix = LAZY_LOCATION + "/"
    for g in _all_graphs(proto.graph):
        for t in g.initializer:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if t.data_location == TensorProto.EXTERNAL and loc is not None and loc.startswith(prefix):
                t.CopyFrom(placeholder(t.name, list(t.dims), Recipe.from_json(loc[len(prefix):])))
    return proto


def ir_recipe(tensor) -> Recipe | None:
    """The recipe of a ``to_ir`` placeholder tensor, None for a tensor that holds data."""
    import onnx_ir as ir

    prefix = LAZY_LOCATION + "/"
    if isinstance(tensor, ir.ExternalTensor) and str(tensor.location).startswith(prefix):
        return Recipe.from_json(str(tensor.location)[len(prefix):])
    return None


def ir_derive(tensor, name: str, *op: Any):
    """``derive`` for an ``onnx_ir`` tensor: a placeholder with a longer recipe, or computed now."""
    import onnx_ir as ir

    r = ir_recipe(tensor)
    if r is not None:
        dims = _apply_shape([int(d) for d in tensor.shape], op)
        return ir.ExternalTensor(f"{LAZY_LOCATION}/{r.then(*op).to_json()}", None, None, tensor.dtype,
                                 shape=ir.Shape(dims), name=name, base_dir="/nonexistent-smlp-placeholder")
    return ir.tensor(np.ascontiguousarray(_apply_numpy(tensor.numpy(), op)), name=name)


# ---------------------------------------------------------------------------------------------
# checkpoints without their weights
# ---------------------------------------------------------------------------------------------
def open_checkpoint(path_or_name: Any = None, *, allow_pickle: bool = False, memory_op: str = "export",
                    dtype: str = "fp32"):
    """A checkpoint as a meta-device ``SMLPForCausalLM`` whose ``weight_source`` reads its
    safetensors file on demand: every check ``load_checkpoint`` makes before building the model
    (format, config, tokenizer, tensor names / shapes / dtypes, sha256), no weight in memory.
    Non-finite values are caught when each tensor is read (``compute``). A pickled checkpoint is
    loaded whole (``load_checkpoint``) and exported from its state dict. Before any module is
    built, ``memory.require(cfg, memory_op, dtype=dtype)`` refuses a model this machine cannot
    export (``memory_op``: "export" or "export+validate")."""
    from ..checkpoint import WEIGHTS_FILE, check_structure, read_header, resolve, sha256_file
    from ..model import load_checkpoint
    from ..errors import CheckpointError

    d = resolve(path_or_name)
    if d.is_file() and d.suffix in (".pt", ".pth", ".bin"):
        return load_checkpoint(d, allow_pickle=allow_pickle)
    if not d.exists():
        raise CheckpointError(f"checkpoint {d} does not exist")
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} is not a directory (expected config.json + model.safetensors)")
    meta, cfg, tok = read_header(d, memory_op=memory_op, dtype=dtype, what=f"exporting {d}")
    wpath = d / WEIGHTS_FILE
    check_structure(wpath, cfg)  # names, shapes, dtypes from the header: no tensor data read
    digest = sha256_file(wpath)
    if meta.get("weights_sha256") not in (None, digest):
        raise CheckpointError(f"{wpath}: sha256 does not match metadata.json (file corrupt or replaced)")
    import torch

    from ..model import SMLPForCausalLM

    with torch.device("meta"):
        model = SMLPForCausalLM(cfg)
    model.eval()
    model.tokenizer = tok
    model.checkpoint_info = {"path": str(d), "metadata": meta, "weights_sha256": digest}
    model.weight_source = _CheckedSource(SafetensorsSource(wpath), wpath)
    return model


class _CheckedSource:
    """A source whose read errors name the checkpoint file (CheckpointError)."""

    def __init__(self, inner: SafetensorsSource, wpath: Path) -> None:
        self.inner, self.wpath = inner, wpath

    def keys(self) -> list[str]:
        return self.inner.keys()

    def get(self, name: str):
        from ..errors import CheckpointError

        try:
            x = self.inner.get(name)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.wpath}: {e}") from None
        import torch

        if not torch.isfinite(x).all():
            raise CheckpointError(f"{self.wpath}: tensor {name} contains NaN or Inf")
        return x
