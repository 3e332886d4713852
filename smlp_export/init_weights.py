"""Streamed random init: ``smlp init`` writes each tensor straight into ``model.safetensors``.

The model is never built: the random draws ``SMLPForCausalLM(cfg)`` makes under
``torch.manual_seed(seed)`` are replayed in the same order (``plan``), each tensor generated in
float32 a slice at a time, cast to the checkpoint dtype and written at its offset in the file.
Peak memory is one slice (at most ``CHUNK`` + 15 elements in float32), not the model: ``--preset 9.4b --dtype fp16`` (18.6 GB) is written in ~1.5 GB.

Same stream, bit for bit: the file equals ``save_checkpoint(SMLPForCausalLM(cfg))`` made under the
same seed, byte for byte (tests/test_init_weights.py compares the sha256 over several configs).
What makes that hold:

- draws that the model later overwrites (each ``nn.Linear``'s default Kaiming init, the embedding's
  N(0, 1) init) are still made, into a scratch buffer, so every later draw sees the same
  generator state;
- PyTorch's CPU ``uniform_`` draws one value per element in order, so any slicing gives the same
  values; ``normal_`` on >= 16 elements fills uniforms then runs Box-Muller on aligned blocks of
  16, and redraws the last 16 when the size is not a multiple of 16: a tensor is therefore sliced
  at multiples of 16 elements, with a last slice of at least 16 (``_slices``);
- the scale ``randn(...) * s`` is applied to each slice in float32 exactly as to the whole, and the
  cast to fp16/bf16 is elementwise;
- the header is safetensors' own: compact JSON, ``__metadata__`` first, names sorted, data in name
  order, padded with spaces to 8 bytes.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from .config import SMLPConfig
from .shapes import state_shapes

CHUNK = 1 << 24  # elements per generated slice (64 MiB in float32); a multiple of 16
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class Draw:
    """One initialisation step of ``SMLPForCausalLM.__init__``, in call order.

    kind: "normal" (``normal_(mean, std)`` on a fresh tensor, then ``* scale`` when scale is not
    None: ``torch.randn(...) * s``), "uniform" (``uniform_(lo, hi)``), "fill" (``fill_(value)``: no
    random draw). ``keep``: the value this step leaves is the tensor's final one (else a later step
    overwrites it; the draw is still made so that the generator advances the same way)."""

    name: str
    shape: tuple[int, ...]
    kind: str
    a: float = 0.0
    b: float = 1.0
    scale: float | None = None
    keep: bool = True


def plan(cfg: SMLPConfig) -> list[Draw]:
    """Every init step of ``SMLPForCausalLM(cfg)`` in the order the constructor runs them
    (model.py: the embedding and its re-draw, the blocks' and lm_head's constructors, then the
    re-init of lm_head and every block's Linear)."""
    shapes = state_shapes(cfg)
    steps: list[Draw] = []

    def linear_default(p: str, bias: bool = True) -> None:
        # nn.Linear.reset_parameters: kaiming_uniform_(weight), uniform_(bias); both re-drawn later
        w = shapes[f"{p}.weight"]
        bound = 1 / math.sqrt(w[1])
        steps.append(Draw(f"{p}.weight", w, "uniform", -bound, bound, keep=False))
        if bias:
            steps.append(Draw(f"{p}.bias", shapes[f"{p}.bias"], "uniform", -bound, bound, keep=False))

    def norm(p: str) -> None:
        steps.extend([Draw(f"{p}.weight", shapes[f"{p}.weight"], "fill", 1.0),
                      Draw(f"{p}.bias", shapes[f"{p}.bias"], "fill", 0.0)])

    def spatial(p: str, bias: str) -> None:
        eps = cfg.spatial_init_eps / cfg.max_seq_len  # model._init_spatial
        steps.extend([Draw(p, shapes[p], "uniform", -eps, eps), Draw(bias, shapes[bias], "fill", 1.0)])

    v = "embed.weight"
    steps.append(Draw(v, shapes[v], "normal", 0.0, 1.0, keep=False))  # nn.Embedding's own N(0, 1)
    steps.append(Draw(v, shapes[v], "normal", 0.0, 0.02))  # re-drawn at once (model.py)
    sparse = set(cfg.sparse_layer_ids())
    linears: list[str] = []
    for i in range(cfg.n_layers):
        p = f"blocks.{i}"
        if i in sparse:
            t = f"{p}.tmoe"
            norm(f"{t}.norm")
            w2_scale = 0.02 / math.sqrt(2 * cfg.n_layers)
            steps += [Draw(f"{t}.centroids", shapes[f"{t}.centroids"], "normal", scale=0.02),
                      Draw(f"{t}.w1", shapes[f"{t}.w1"], "normal", scale=0.02),
                      Draw(f"{t}.b1", shapes[f"{t}.b1"], "fill", 0.0),
                      Draw(f"{t}.w2", shapes[f"{t}.w2"], "normal", scale=w2_scale),
                      Draw(f"{t}.b2", shapes[f"{t}.b2"], "fill", 0.0)]
            norm(f"{p}.norm1")
            s = f"{p}.smoe"
            norm(f"{s}.norm")
            linear_default(f"{s}.proj_in")
            norm(f"{s}.norm_z2")
            spatial(f"{s}.weight", f"{s}.bias")
            if cfg.spatial_routing == "partial":
                steps.append(Draw(f"{s}.router", shapes[f"{s}.router"], "normal", scale=0.02))
            linear_default(f"{s}.proj_out")
            norm(f"{p}.norm2")
            linears += [f"{s}.proj_in", f"{s}.proj_out"]
        else:
            norm(f"{p}.norm")
            linear_default(f"{p}.proj_in")
            norm(f"{p}.norm_z2")
            spatial(f"{p}.spatial.weight", f"{p}.spatial.bias")
            linear_default(f"{p}.proj_out")
            linears += [f"{p}.proj_in", f"{p}.proj_out"]
    norm("norm_f")
    linear_default("lm_head", cfg.lm_head_bias)
    steps.append(Draw("lm_head.weight", shapes["lm_head.weight"], "normal", 0.0, 0.02))
    if cfg.lm_head_bias:
        steps.append(Draw("lm_head.bias", shapes["lm_head.bias"], "fill", 0.0))
    for p in linears:
        steps += [Draw(f"{p}.weight", shapes[f"{p}.weight"], "normal", 0.0, 0.02),
                  Draw(f"{p}.bias", shapes[f"{p}.bias"], "fill", 0.0)]
    # keep only the last step of each tensor: the constructor's earlier values are overwritten
    last = {s.name: i for i, s in enumerate(steps)}
    return [s if last[s.name] == i else Draw(s.name, s.shape, s.kind, s.a, s.b, s.scale, keep=False)
            for i, s in enumerate(steps)]


def _slices(kind: str, numel: int) -> list[tuple[int, int]]:
    """Flat [start, stop) slices that draw the same values as one call on the whole tensor.

    ``normal_``: every slice but the last is a multiple of 16 (``CHUNK``), and the last holds at
    least 16 elements (a shorter tail joins the slice before it): the whole tensor's redraw of its
    last 16 values then happens in the last slice, identically."""
    out = [(s, min(s + CHUNK, numel)) for s in range(0, numel, CHUNK)]
    if kind == "normal" and len(out) > 1 and out[-1][1] - out[-1][0] < 16:
        out[-2:] = [(out[-2][0], numel)]
    return out


def _generate(step: Draw, emit: Callable[[torch.Tensor], None]) -> None:
    """Make ``step``'s draws slice by slice; ``emit`` gets each float32 slice (flat) in order."""
    numel = math.prod(step.shape)
    if step.kind == "fill":
        for s, e in _slices("fill", numel):
            emit(torch.full((e - s,), step.a, dtype=torch.float32))
        return
    for s, e in _slices(step.kind, numel):
        x = torch.empty(e - s, dtype=torch.float32)
        if step.kind == "normal":
            x.normal_(step.a, step.b)
            if step.scale is not None:
                x = x * step.scale
        else:
            x.uniform_(step.a, step.b)
        emit(x)


def header(cfg: SMLPConfig, dtype: torch.dtype, metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """safetensors header bytes (length prefix included) and each tensor's absolute file offset."""
    shapes = state_shapes(cfg)
    item = torch.empty((), dtype=dtype).element_size()
    body: dict[str, object] = {"__metadata__": metadata}
    offsets: dict[str, int] = {}
    pos = 0
    for name in sorted(shapes):
        n = math.prod(shapes[name]) * item
        body[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shapes[name]), "data_offsets": [pos, pos + n]}
        offsets[name] = pos
        pos += n
    text = json.dumps(body, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {k: start + v for k, v in offsets.items()}


def file_bytes(cfg: SMLPConfig, dtype: torch.dtype) -> int:
    head, _ = header(cfg, dtype, {"format": "pt"})
    item = torch.empty((), dtype=dtype).element_size()
    return len(head) + item * sum(math.prod(s) for s in state_shapes(cfg).values())


def write_random_init(cfg: SMLPConfig, path: str | os.PathLike, *, seed: int, dtype: torch.dtype,
                      progress: Callable[[int], None] | None = None) -> str:
    """Write the random init of ``cfg`` under ``seed`` as ``path`` (safetensors, ``dtype``);
    returns the file's sha256. ``progress(bytes)`` is called after each slice written."""
    if dtype not in ST_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}")
    head, offsets = header(cfg, dtype, {"format": "pt"})
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(file_bytes(cfg, dtype))
            for step in plan(cfg):
                _write_step(f, step, offsets[step.name], dtype, progress)
    finally:
        torch.random.set_rng_state(gen_state)  # the caller's generator is left as it was
    from .fsutil import sha256_file

    return sha256_file(Path(path))


def _write_step(f: BinaryIO, step: Draw, offset: int, dtype: torch.dtype,
                progress: Callable[[int], None] | None) -> None:
    if step.keep:
        f.seek(offset)

    def emit(x: torch.Tensor) -> None:
        if not step.keep:
            return  # a draw the constructor overwrites: made for the generator's sake only
        f.write(memoryview(x.to(dtype).view(torch.uint8).numpy()))
        if progress is not None:
            progress(x.numel() * x.element_size())

    _generate(step, emit)



def peak_numel(cfg: SMLPConfig) -> int:
    """Most float32 elements one generated slice holds (what ``smlp init`` needs besides the
    interpreter): at most ``CHUNK`` + 15."""
    return max((e - s for st in plan(cfg) for s, e in _slices(st.kind, math.prod(st.shape))), default=0)
