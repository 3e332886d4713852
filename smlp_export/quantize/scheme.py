"""Weight-only quantization scheme: which weights, how many bits, which blocks; one NumPy formula.

Symmetric, no zero points (documented in docs/export.md, "Quantized exports"): each block of
``block`` consecutive weights along a weight's *input-feature* axis (the last axis of the model's
parameter: ``nn.Linear`` rows, expert ``w1`` [E, f, d] / ``w2`` [E, d, f]) shares one float32 scale

    scale = max|w| / qmax   (qmax = 2^(bits-1) - 1; a block of zeros gets scale 1)
    q     = clip(rint(w / scale), -qmax - 1, qmax)          (int8 values)
    w'    = q * scale                                        (float32, what every runtime computes)

``quantize`` / ``dequantize`` here are the only implementation: the exporter packs their output for
ONNX Runtime (``MatMulNBits``, ``QMoE``: unsigned with the operators' default zero point
2^(bits-1)) or for ``DequantizeLinear`` (signed int4 / int8), and the validator's fake-quant twin
(``twin.py``) loads ``dequantize(quantize(w))`` into PyTorch, so both sides hold identical numbers.

Which weights: dense projections (``proj_in`` / ``proj_out`` of every block and of the sMoE), the
token experts (``tmoe.w1`` / ``tmoe.w2``) and the LM head. Float: embeddings, LayerNorms, biases,
the token router (centroids), the spatial n x n weights and spatial experts (docs: a decode step
reads one row of them, so quantizing them saves file bytes but not bytes per token) and the
partial-routing router.

int8 experts are quantized per output channel (one scale per row of each expert): ONNX Runtime's
block-wise 8-bit ``QMoE`` CPU kernel quantizes the *activations* to int8 as well (measured error
4e-2 against 1e-6 per channel), which is not weight-only and would not match the twin.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import SMLPError

METHODS = {"int8": 8, "int4": 4}
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK = 32
MIN_OPSET_DQ = 21  # DequantizeLinear with int4 and block_size

# parameter name -> kind; the first matching pattern wins
_RULES: tuple[tuple[str, str], ...] = (
    (r"blocks\.\d+\.(smoe\.)?proj_(in|out)\.weight", "dense"),
    (r"blocks\.\d+\.tmoe\.w[12]", "expert"),
    (r"lm_head\.weight", "dense"),
)


class QuantizeError(SMLPError):
    """A quantization request that cannot be carried out as asked."""


@dataclass(frozen=True)
class QuantScheme:
    """``method`` int8|int4; ``block_size`` of dense weights (and int4 experts); ``expert_block``
    0 = one scale per output channel."""

    method: str
    bits: int
    block_size: int
    expert_block: int

    @classmethod
    def make(cls, method: str, block_size: int | None = None) -> "QuantScheme":
        if method not in METHODS:
            raise QuantizeError(f"unknown --quantize {method!r}; choose one of {', '.join(METHODS)}")
        block = DEFAULT_BLOCK if block_size is None else int(block_size)
        if block not in BLOCK_SIZES:
            raise QuantizeError(f"--block-size {block} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        bits = METHODS[method]
        return cls(method, bits, block, 0 if bits == 8 else block)

    @classmethod
    def from_manifest(cls, entry: dict) -> "QuantScheme":
        return cls(entry["method"], int(entry["bits"]), int(entry["block_size"]), int(entry["expert_block"]))

    def block_for(self, kind: str) -> int:
        """Block size of a weight of ``kind`` ("dense" | "expert"); 0 = per output channel."""
        return self.expert_block if kind == "expert" else self.block_size

    def to_manifest(self) -> dict:
        d = asdict(self)
        d.update(symmetric=True, zero_point=None, axis="input features (last axis of the parameter)",
                 scale_dtype="float32")
        return d


def weight_kind(param: str) -> str | None:
    """"dense" | "expert" for a parameter the scheme quantizes, else None."""
    for pattern, kind in _RULES:
        if re.fullmatch(pattern, param):
            return kind
    return None


def quantized_parameters(names) -> dict[str, str]:
    """{parameter name: kind} of the state-dict ``names`` the scheme quantizes."""
    return {n: k for n in names if (k := weight_kind(n)) is not None}


def check_widths(model_names_shapes: dict[str, tuple[int, ...]], scheme: QuantScheme) -> None:
    """Refuse a block size that does not divide the input width of every quantized weight."""
    for name, kind in quantized_parameters(model_names_shapes).items():
        block = scheme.block_for(kind)
        k = model_names_shapes[name][-1]
        if block and k % block:
            raise QuantizeError(f"--block-size {block} does not divide the input width {k} of {name} "
                                f"(choose a block size that divides {k})")


def quantize(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """w [..., K] float -> (q int8 [..., K], scale float32 [..., K / block]); block 0 = K."""
    w = np.asarray(w, dtype=np.float32)
    k = w.shape[-1]
    block = block or k
    if k % block:
        raise QuantizeError(f"block size {block} does not divide width {k}")
    wb = w.reshape(*w.shape[:-1], k // block, block)
    qmax = 2 ** (bits - 1) - 1
    scale = (np.abs(wb).max(axis=-1) / np.float32(qmax)).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(wb / scale[..., None]), -qmax - 1, qmax).astype(np.int8)
    return q.reshape(w.shape), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(q [..., K], scale [..., K / block]) -> float32 [..., K]: q * scale."""
    nb = scale.shape[-1]
    k = q.shape[-1]
    qb = q.astype(np.float32).reshape(*q.shape[:-1], nb, k // nb)
    return (qb * scale[..., None]).reshape(q.shape)


def pack_unsigned(q: np.ndarray, bits: int) -> np.ndarray:
    """ONNX Runtime layout (MatMulNBits B, QMoE fc*_experts_weights): q + 2^(bits-1) as uint8;
    4 bits: two values per byte along the last axis, the first in the low nibble."""
    u = (q.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 8:
        return u
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def pack_signed_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 raw data: two's-complement nibbles, element 2i in the low nibble of byte i."""
    flat = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
