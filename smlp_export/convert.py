"""Import checkpoints trained elsewhere (``smlp convert``); today: lucidrains' ``g-mlp-pytorch``.

A causal ``gMLP(num_tokens=V, dim=d, depth=L, seq_len=n, ff_mult=m)`` language model is exactly this
project's model with ``n_sparse=0`` (only dense blocks) and ``lm_head_bias=True``:

    x = to_embed(ids)
    x = x + proj_out(res * (tril(W[:T, :T]) @ LN(gate) + b[:T]))   with  res, gate = GELU(proj_in(LN x)).chunk(2)
    logits = to_logits(x)                                            (LayerNorm, then Linear with bias)

Every hyperparameter that the weights show (V, d, d_ffn, n, depth, heads) is read from the tensor
shapes; those that leave no trace (``causal``, ``act``, ``shift_tokens``) are declared by the caller
with the library's defaults. What the model cannot represent exactly is refused with one line.
The source is read with ``torch.load(weights_only=True)`` (or safetensors); nothing is unpickled.
docs/model.md ("Converting from g-mlp-pytorch") has the key mapping.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import SMLPConfig
from .errors import SMLPError
from .fsutil import sha256_file as _sha256

SOURCES = ("g-mlp-pytorch",)
# g-mlp-pytorch's gMLP defaults for what its weights do not record.
GMLP_DEFAULTS = {"causal": False, "act": "identity", "shift_tokens": 0}
# g-mlp-pytorch builds every LayerNorm with torch's default eps and nn.GELU() (erf): the model's defaults.
GMLP_LAYER_NORM_EPS = 1e-5
CHECK_TOLERANCE = 1e-4  # of the logits' scale (max |logit|), fp32


class ConversionError(SMLPError):
    """A source file that cannot be read, or a model this project cannot represent exactly."""


@dataclass
class GMLPWeights:
    """The source tensors, renamed to this project's keys, plus what the shapes showed."""

    vocab_size: int
    d_model: int
    d_ffn: int
    seq_len: int
    depth: int
    layout: str  # which g-mlp-pytorch key layout the file uses
    prefix: str  # "net." (AutoregressiveWrapper) or ""
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # unused tensors of the source (0.1.0's sgu.proj)


# ---------------------------------------------------------------------------------------------
# reading the source file
# ---------------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``torch.save(model.state_dict())`` file (``weights_only=True``) or a ``.safetensors`` file."""
    p = Path(path)
    if not p.exists():
        raise ConversionError(f"{p} does not exist")
    if not p.is_file():
        raise ConversionError(f"{p} is not a file (expected a state dict saved with torch.save)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p))
        except Exception as e:  # safetensors' own error types for corrupt headers
            raise ConversionError(f"{p}: corrupt or truncated safetensors file ({_first_line(e)})") from None
    else:
        import pickle
        import zipfile

        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # weights_only refuses any global that is not a tensor/container: code in the pickle.
            from .safe_load import describe_load_error, forbidden_global

            g = forbidden_global(e)
            what = f"it references {g}" if g else describe_load_error(e)
            raise ConversionError(f"{p}: refused: the pickle holds more than tensors ({what}); only state dicts "
                                  "are read (torch.load weights_only=True), code is never unpickled") from None
        except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError) as e:
            raise ConversionError(f"{p}: not a readable torch.save file (truncated or corrupt?): "
                                  f"{_first_line(e).split('. ')[0]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a training-script checkpoint {"state_dict": ..., ...}
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise ConversionError(f"{p}: expected a state dict (parameter name -> tensor), got {type(obj).__name__}")
    return obj


def require_memory(sd: dict[str, torch.Tensor], source: str) -> int:
    """Refuse, with one line, a state dict whose tensors need more memory once materialised than
    this machine has. What a file stores says little: ``torch.load`` returns views, and a view with
    stride 0 (``expand``) spans billions of elements over a one-element storage (a 5 KB file can
    ask for 17 GB). The estimate counts every tensor's elements: its float32 copy and the model's
    own parameters (2 x 4 bytes each) plus the interpreter (``memory.BASE``). Returns the estimate."""
    from . import memory

    logical = 4 * sum(v.numel() for v in sd.values())
    stored = sum({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in sd.values()}.values())
    need = memory.BASE + 2 * logical
    have = memory.available_bytes()
    if need > have and os.environ.get("SMLP_SKIP_MEMORY_CHECK") != "1":
        views = (f" (the file stores {stored:,} bytes of tensor data: its tensors are views that repeat it)"
                 if logical > 2 * stored else "")
        raise ConversionError(f"{source}: its tensors hold {logical / memory.GiB:,.1f} GiB in float32{views}; "
                              f"converting needs about {need / memory.GiB:,.1f} GiB of memory but only "
                              f"{have / memory.GiB:,.1f} GiB is available (SMLP_SKIP_MEMORY_CHECK=1 to try anyway)")
    return need


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# ---------------------------------------------------------------------------------------------
# g-mlp-pytorch -> this model
# ---------------------------------------------------------------------------------------------
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
# Per-block key layouts of the 0.0.x / 0.1.x releases (X = the gMLPBlock's prefix):
#   0.1.5           Residual(PreNorm(PreShiftTokens(gMLPBlock)))  X = "fn.fn.fn."
#   0.0.1x - 0.1.4  Residual(PreNorm(gMLPBlock))                  X = "fn.fn."
#   early 0.0.x     Residual(Sequential(LayerNorm, Linear, GELU, SpatialGatingUnit, Linear))
_BLOCK_PREFIXES = ("fn.fn.fn.", "fn.fn.")


def _block_keys(rest: set[str]) -> tuple[str, dict[str, str]]:
    """-> (layout name, this model's block key suffix -> source suffix) for one layer's keys."""
    for pre in _BLOCK_PREFIXES:
        if any(r.startswith(pre) for r in rest):
            m = {"norm": "fn.norm", "proj_in": pre + "proj_in.0", "norm_z2": pre + "sgu.norm",
                 "sgu": pre + "sgu", "proj_out": pre + "proj_out", "attn": pre + "attn."}
            return ("PreNorm(PreShiftTokens(gMLPBlock))" if pre == "fn.fn.fn." else "PreNorm(gMLPBlock)"), m
    if any(r.startswith("fn.1.") for r in rest):
        return "Sequential", {"norm": "fn.0", "proj_in": "fn.1", "norm_z2": "fn.3.norm", "sgu": "fn.3",
                              "proj_out": "fn.4", "attn": "fn.3.attn."}
    raise ConversionError("unrecognised block layout")


def map_gmlp_state_dict(sd: dict[str, torch.Tensor], *, causal: bool = GMLP_DEFAULTS["causal"],
                        act: str = GMLP_DEFAULTS["act"], shift_tokens: int = GMLP_DEFAULTS["shift_tokens"],
                        source: str = "SRC") -> GMLPWeights:
    """Check and rename a g-mlp-pytorch ``gMLP`` state dict. One ``ConversionError`` line for
    anything that does not fit or that this model cannot represent exactly."""
    def fail(msg: str) -> ConversionError:
        return ConversionError(f"{source}: {msg}")

    # -- prefix ------------------------------------------------------------------------------------
    prefix = ""
    if all(k.startswith("net.") for k in sd):
        prefix = "net."  # AutoregressiveWrapper(gMLP)
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    for k, v in sd.items():
        if not v.is_floating_point():
            raise fail(f"tensor {prefix}{k} has dtype {v.dtype}; expected floating-point weights")
    if "to_embed.weight" not in sd or "to_logits.1.weight" not in sd:
        sample = ", ".join(sorted(sd)[:3])
        raise fail(f"not a g-mlp-pytorch gMLP language model state dict (no to_embed.weight / to_logits.1.weight; "
                   f"keys start {sample}, ...)")

    def get(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in sd:
            raise fail(f"missing tensor {prefix}{key}")
        t = sd[key]
        if tuple(t.shape) != shape:
            raise fail(f"tensor {prefix}{key} has shape {list(t.shape)}, expected {list(shape)} "
                       "(a shape that does not fit the others)")
        return t

    emb = sd["to_embed.weight"]
    if emb.dim() != 2:
        raise fail(f"tensor {prefix}to_embed.weight has shape {list(emb.shape)}, expected [num_tokens, dim]")
    V, d = (int(s) for s in emb.shape)
    if V < 256:
        raise fail(f"num_tokens={V} < 256: checkpoints here carry a byte tokenizer, which needs ids 0..255")

    # -- layers --------------------------------------------------------------------------------
    by_layer: dict[int, set[str]] = {}
    top = set()
    for k in sd:
        m = _LAYER.match(k)
        if m:
            by_layer.setdefault(int(m.group(1)), set()).add(m.group(2))
        else:
            top.add(k)
    extra_top = sorted(top - {"to_embed.weight", "to_logits.0.weight", "to_logits.0.bias",
                              "to_logits.1.weight", "to_logits.1.bias"})
    if extra_top:
        raise fail(f"unexpected tensor {prefix}{extra_top[0]} (not part of a g-mlp-pytorch gMLP)")
    depth = len(by_layer)
    if depth == 0 or sorted(by_layer) != list(range(depth)):
        raise fail(f"layers must be numbered 0..depth-1, found {sorted(by_layer)[:8]}")

    out: dict[str, torch.Tensor] = {"embed.weight": emb}
    d_ffn = n = None
    layout = ""
    ignored: list[str] = []
    for i in range(depth):
        rest = set(by_layer[i])
        src = f"layers.{i}."
        try:
            layout, m = _block_keys(rest)
        except ConversionError:
            raise fail(f"layer {i}: unrecognised key layout ({prefix}{src}{sorted(rest)[0]}, ...)") from None
        sgu = m["sgu"]
        if any(r.startswith(m["attn"]) or r.startswith(f"{sgu}.attn.") for r in rest):
            raise fail("tiny attention (attn_dim) cannot be represented: this model has no attention")
        if any(r.startswith(f"{sgu}.circulant_pos") for r in rest):
            raise fail("circulant spatial matrices (circulant_matrix=True) cannot be represented")
        if d_ffn is None:
            pw = sd.get(src + m["proj_in"] + ".weight")
            if pw is None or pw.dim() != 2:
                raise fail(f"missing tensor {prefix}{src}{m['proj_in']}.weight")
            d_ffn = int(pw.shape[0])
            if d_ffn % 2:
                raise fail(f"dim_ff={d_ffn} is odd: the gate split needs an even width")
        c = d_ffn // 2
        used = set()

        def take(theirs: str, shape: tuple[int, ...]) -> torch.Tensor:
            used.add(theirs)
            return get(src + theirs, shape)

        blk = f"blocks.{i}."
        for ours, shapes in (("norm", ((d,), (d,))), ("proj_in", ((d_ffn, d), (d_ffn,))),
                             ("norm_z2", ((c,), (c,))), ("proj_out", ((d, c), (d,)))):
            out[blk + ours + ".weight"] = take(m[ours] + ".weight", shapes[0])
            out[blk + ours + ".bias"] = take(m[ours] + ".bias", shapes[1])
        # spatial weight: 0.1.2+ sgu.weight [heads, n, n] + sgu.bias [heads, n]; 0.1.0-0.1.1 sgu.weight
        # [n, n] + sgu.bias [n] (next to an unused Conv1d sgu.proj); 0.0.x Conv1d sgu.proj.weight
        # [n, n, 1] + sgu.proj.bias [n]. All compute s[m] = sum_j W[m, j] gate[j] + b[m], j <= m.
        wkey = f"{sgu}.weight" if f"{sgu}.weight" in rest else f"{sgu}.proj.weight"
        bkey = wkey[: -len("weight")] + "bias"
        if wkey not in rest:
            raise fail(f"missing tensor {prefix}{src}{sgu}.weight (the spatial gating unit's weight)")
        w = sd[src + wkey]
        if wkey.endswith("proj.weight"):
            if w.dim() != 3 or w.shape[2] != 1 or w.shape[0] != w.shape[1]:
                raise fail(f"tensor {prefix}{src}{wkey} has shape {list(w.shape)}, expected [n, n, 1]")
            w = w[:, :, 0]
        elif w.dim() == 3:
            if w.shape[0] != 1:
                raise fail(f"heads={w.shape[0]} cannot be represented: a dense block has one spatial weight "
                           "shared by all channels (only heads=1 converts)")
            w = w[0]
        if w.dim() != 2 or w.shape[0] != w.shape[1]:
            raise fail(f"tensor {prefix}{src}{wkey} has shape {list(sd[src + wkey].shape)}: not a square spatial "
                       "weight (circulant matrices cannot be represented)")
        if n is None:
            n = int(w.shape[0])
        if tuple(w.shape) != (n, n):
            raise fail(f"tensor {prefix}{src}{wkey} has shape {list(w.shape)}, expected [{n}, {n}] as in layer 0")
        used.add(wkey)
        if bkey not in rest:
            raise fail(f"missing tensor {prefix}{src}{bkey} (the spatial gating unit's bias)")
        b = sd[src + bkey]
        used.add(bkey)
        if b.dim() == 2 and b.shape[0] == 1:
            b = b[0]
        if tuple(b.shape) != (n,):
            raise fail(f"tensor {prefix}{src}{bkey} has shape {list(sd[src + bkey].shape)}, expected [{n}]")
        out[blk + "spatial.weight"] = w
        out[blk + "spatial.bias"] = b
        leftover = sorted(rest - used)
        if leftover == [f"{sgu}.proj.bias", f"{sgu}.proj.weight"] and wkey == f"{sgu}.weight":
            ignored += [prefix + src + k for k in leftover]  # 0.1.0-0.1.1: created but never used
        elif leftover:
            raise fail(f"unexpected tensor {prefix}{src}{leftover[0]} (not part of a g-mlp-pytorch gMLP block)")
    out["norm_f.weight"] = get("to_logits.0.weight", (d,))
    out["norm_f.bias"] = get("to_logits.0.bias", (d,))
    out["lm_head.weight"] = get("to_logits.1.weight", (V, d))
    out["lm_head.bias"] = get("to_logits.1.bias", (V,))
    # -- what leaves no trace in the weights: declared by the caller (checked after the
    # structure, so a file that is not a gMLP at all says so first) --------------------------------
    if not causal:
        raise fail("non-causal gMLP (g-mlp-pytorch's default causal=False) cannot be represented: this "
                   "model is a causal language model; if SRC was built with gMLP(causal=True), pass --causal")
    if act.strip().lower().removeprefix("nn.").removesuffix("()") != "identity":
        raise fail(f"act={act!r} cannot be represented: the spatial gate here has no activation "
                   "(only g-mlp-pytorch's default act=nn.Identity() converts)")
    if shift_tokens != 0:
        raise fail(f"shift_tokens={shift_tokens} cannot be represented (token shifting is not part of this model)")
    for k, v in out.items():
        if not torch.isfinite(v).all():
            raise fail(f"tensor for {k} contains NaN or Inf")
    return GMLPWeights(V, d, d_ffn, n, depth, layout, prefix,
                       {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}, ignored)


def gmlp_config(w: GMLPWeights, *, eos_token_id: int | None = None) -> SMLPConfig:
    """The config of the equivalent model: dense blocks only, bias on the vocabulary projection.

    The MoE fields are unused with ``n_sparse=0``; they are set to the smallest valid values."""
    return SMLPConfig(vocab_size=w.vocab_size, d_model=w.d_model, n_layers=w.depth, n_sparse=0,
                      max_seq_len=w.seq_len, d_ffn=w.d_ffn, n_token_experts=1, d_expert=1, n_spatial_experts=1,
                      layer_norm_eps=GMLP_LAYER_NORM_EPS, eos_token_id=eos_token_id, lm_head_bias=True)


def gmlp_reference_logits(w: GMLPWeights, ids: torch.Tensor) -> torch.Tensor:
    """g-mlp-pytorch's causal forward, written out from its source on the mapped tensors (a plain-torch
    twin independent of ``SMLPForCausalLM``; the convert self-check compares the two). ids [B, T] -> [B, T, V]."""
    s, T = w.state, ids.shape[1]
    x = F.embedding(ids, s["embed.weight"])
    for i in range(w.depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (w.d_model,), s[p + "norm.weight"], s[p + "norm.bias"], GMLP_LAYER_NORM_EPS)
        h = F.gelu(F.linear(h, s[p + "proj_in.weight"], s[p + "proj_in.bias"]))
        res, gate = h.chunk(2, dim=-1)
        gate = F.layer_norm(gate, (w.d_ffn // 2,), s[p + "norm_z2.weight"], s[p + "norm_z2.bias"], GMLP_LAYER_NORM_EPS)
        W = s[p + "spatial.weight"][:T, :T].masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), 0.0)
        gate = torch.einsum("bnd,mn->bmd", gate, W) + s[p + "spatial.bias"][None, :T, None]
        x = x + F.linear(gate * res, s[p + "proj_out.weight"], s[p + "proj_out.bias"])
    x = F.layer_norm(x, (w.d_model,), s["norm_f.weight"], s["norm_f.bias"], GMLP_LAYER_NORM_EPS)
    return F.linear(x, s["lm_head.weight"], s["lm_head.bias"])


@dataclass
class ConvertResult:
    path: Path
    config: SMLPConfig
    layout: str
    prefix: str
    num_parameters: int
    check_max_abs_diff: float | None
    check_scale: float | None
    ignored: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "config": self.config.to_dict(), "layout": self.layout,
                "prefix": self.prefix, "num_parameters": self.num_parameters,
                "check": None if self.check_max_abs_diff is None else
                {"max_abs_diff": self.check_max_abs_diff, "logit_scale": self.check_scale,
                 "tolerance": CHECK_TOLERANCE},
                "ignored_tensors": self.ignored}


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, source_format: str = "g-mlp-pytorch",
                       causal: bool = GMLP_DEFAULTS["causal"], act: str = GMLP_DEFAULTS["act"],
                       shift_tokens: int = GMLP_DEFAULTS["shift_tokens"], eos_token_id: int | None = None,
                       overwrite: bool = False, check: bool = True, command: str | None = None) -> ConvertResult:
    """Convert ``src`` into a checkpoint directory ``out`` (written atomically, only if all checks pass).

    ``check``: run the converted model and the plain-torch twin of the source's forward on random
    tokens and refuse if they differ by more than ``CHECK_TOLERANCE`` of the logits' scale."""
    from .checkpoint import save_checkpoint
    from .errors import ConfigError
    from .model import SMLPForCausalLM

    if source_format not in SOURCES:
        raise ConversionError(f"unknown source format {source_format!r}; choose one of {', '.join(SOURCES)}")
    from .fsutil import check_output

    # before reading SRC; --force never replaces a folder holding SRC, nor one smlp did not write
    out = check_output(out, force=overwrite, inputs=[src], error=ConversionError)
    sd = read_state_dict(src)
    require_memory(sd, str(src))  # before map_gmlp_state_dict materialises every tensor in float32
    w = map_gmlp_state_dict(sd, causal=causal, act=act, shift_tokens=shift_tokens, source=str(src))
    try:
        cfg = gmlp_config(w, eos_token_id=eos_token_id)
    except ConfigError as e:
        raise ConversionError(f"{src}: {e}") from None
    model = SMLPForCausalLM(cfg)
    model.load_state_dict(w.state, strict=True)
    model.eval()
    diff = scale = None
    if check:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=g)
        with torch.no_grad():
            ours, ref = model(ids), gmlp_reference_logits(w, ids)
        scale = float(ref.abs().max())
        diff = float((ours - ref).abs().max())
        if not diff <= CHECK_TOLERANCE * max(scale, 1e-6):
            raise ConversionError(f"{src}: converted model differs from the source's forward by {diff:.3g} "
                                  f"(logit scale {scale:.3g}); nothing written")
    meta = {"kind": "converted", "command": command,
            "source": {"format": source_format, "path": str(src), "sha256": _sha256(Path(src)),
                       "layout": w.layout, "prefix": w.prefix, "causal": causal, "act": act,
                       "shift_tokens": shift_tokens, "ignored_tensors": w.ignored},
            "check": None if diff is None else {"max_abs_diff": diff, "logit_scale": scale}}
    save_checkpoint(model, out, metadata=meta, overwrite=overwrite, inputs=(src,))
    return ConvertResult(out, cfg, w.layout, w.prefix, model.num_parameters(), diff, scale, w.ignored)
