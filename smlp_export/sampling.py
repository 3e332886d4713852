"""The rules of generation (checks, token choice, stopping), self-contained: numpy and stdlib only.

The input checks (ids, position, states, prompt) are the project's only ones: the PyTorch model,
the PyTorch decode steps and the ONNX Runtime decoder call them too (they take numpy arrays and
torch tensors alike, by shape / dtype name / min / max).

One implementation used in two places:

- ``smlp_export.decode.runtime.Generator.generate`` (``smlp generate``, every backend);
- Triton's python backend, where ``smlp deploy --backend python`` copies this file verbatim as
  ``smlp_sampling.py`` next to the ``<name>_generate`` model's ``model.py``
  (``smlp_export.deploy.generate_model``). That server (e.g. the NGC container) has no smlp_export,
  so this module must never import it: the served model and ``smlp generate`` then draw the same
  tokens for a seed because they run the same code, not two copies kept in step by hand.

Errors are raised as ``error(message)`` (one line naming the problem); callers pass their own
exception class (``InputError`` in the library, a plain ``ValueError`` in the served model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

STOP_EOS, STOP_MAX_NEW, STOP_MAX_SEQ = "eos", "max_new_tokens", "max_seq_len"
STOP_REASONS = (STOP_EOS, STOP_MAX_NEW, STOP_MAX_SEQ)


def softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def choose(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> next ids [B] int64. temperature 0: greedy argmax (first max on ties).

    Sampling: float64 softmax of (logits - max) / T over the top-k (ties with the k-th kept), then one
    ``rng.random()`` per row inverted through the cumulative distribution."""
    if temperature <= 0:
        return logits.argmax(axis=-1).astype(np.int64)
    # subtract the max before dividing: a tiny temperature then gives -inf/0, never inf - inf = nan
    z = logits.astype(np.float64)
    z = (z - z.max(axis=-1, keepdims=True)) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    p = softmax64(z)
    u = rng.random(p.shape[0])
    idx = (p.cumsum(axis=-1) < u[:, None]).sum(axis=-1)
    return np.minimum(idx, p.shape[-1] - 1).astype(np.int64)


def check_options(max_new_tokens: int, temperature: float, top_k: int | None, seed: int,
                  error: Callable[[str], Exception] = ValueError) -> None:
    """One ``error`` for the first bad generation option."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise error(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not np.isfinite(temperature) or temperature < 0:  # nan would sample token 0 forever
        raise error(f"temperature must be a finite number >= 0, got {temperature}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise error(f"seed must be an integer >= 0, got {seed!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise error(f"top_k must be an integer >= 1, got {top_k!r}")


def _dtype_name(dtype) -> str:
    """numpy ``int64`` and torch ``torch.int64`` -> ``"int64"`` (one spelling in every message)."""
    return str(dtype).removeprefix("torch.")


def check_vocab(ids, vocab_size: int, error: Callable[[str], Exception] = ValueError) -> None:
    """Every id of ``ids`` (numpy array or torch tensor, not empty) in [0, vocab_size)."""
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise error(f"token id {hi if hi >= vocab_size else lo} outside the vocabulary [0, {vocab_size})")


def check_ids(ids, *, vocab_size: int, max_tokens: int | None = None, dtypes: tuple[str, ...] = ("int64", "int32"),
              values: bool = True, error: Callable[[str], Exception] = ValueError) -> tuple[int, int]:
    """input_ids [batch, seq] (numpy array or torch tensor) -> (batch, seq); one ``error`` if the
    shape is not 2-D with seq >= 1, seq > ``max_tokens``, the dtype is not one of ``dtypes`` or an
    id lies outside the vocabulary (``values=False`` skips the data: shape checks only, trace-safe)."""
    shape = tuple(getattr(ids, "shape", ()))
    if not hasattr(ids, "dtype") or len(shape) != 2 or shape[1] < 1:
        raise error(f"input_ids must be [batch, seq] token ids with seq >= 1, got "
                    f"{f'shape {shape}' if hasattr(ids, 'dtype') else type(ids).__name__}")
    if max_tokens is not None and shape[1] > max_tokens:
        raise error(f"sequence length {shape[1]} exceeds max_seq_len {max_tokens}")
    if _dtype_name(ids.dtype) not in dtypes:
        raise error(f"input_ids must be {' or '.join(dtypes)}, got {_dtype_name(ids.dtype)}")
    if values and shape[0] > 0:
        check_vocab(ids, vocab_size, error)
    return shape[0], shape[1]


def check_position(position: int, new_tokens: int, *, max_seq_len: int, min_prompt_tokens: int = 1,
                   error: Callable[[str], Exception] = ValueError) -> int:
    """A step of ``new_tokens`` at ``position``: an int >= 0 with position + new_tokens <= max_seq_len;
    partial-prediction models (min_prompt_tokens = p > 1) need the first step to cover [0, p)."""
    if isinstance(position, (bool, np.bool_)) or not isinstance(position, (int, np.integer)):
        raise error(f"position must be an int, got {type(position).__name__}")
    position = int(position)
    if position < 0:
        raise error(f"position must be >= 0, got {position}")
    end = position + new_tokens
    if end > max_seq_len:
        raise error(f"position {position} + {new_tokens} new token(s) = {end} exceeds max_seq_len {max_seq_len}")
    p = min_prompt_tokens
    if end < p:
        raise error(f"partial-prediction model: spatial routing is fixed from the first p = {p} tokens, so the "
                    f"prompt (first step) needs at least {p} tokens; got {end}. Use a longer prompt "
                    f"(incremental decoding cannot re-route earlier positions)")
    return position


def check_states(states, *, names: list[str], shape: tuple[int, ...], dtype=None,
                 error: Callable[[str], Exception] = ValueError) -> None:
    """One state per name, each of ``shape`` ([batch, max_seq_len, c]) and ``dtype`` (when given)."""
    if len(states) != len(names):
        raise error(f"expected {len(names)} state tensors (one per block), got {len(states)}")
    for name, st in zip(names, states):
        got = tuple(st.shape) if hasattr(st, "shape") else None
        if got != tuple(shape):
            raise error(f"{name} has shape {got}, expected {tuple(shape)} [batch, max_seq_len, c]")
        if dtype is not None and _dtype_name(st.dtype) != _dtype_name(dtype):
            raise error(f"{name} has dtype {_dtype_name(st.dtype)}, expected {_dtype_name(dtype)}")


def check_prompt(prompt: np.ndarray, *, vocab_size: int, max_seq_len: int, min_prompt_tokens: int = 1,
                 error: Callable[[str], Exception] = ValueError) -> None:
    """prompt [B, T] integer ids: one ``error`` if it cannot start a generation."""
    if prompt.ndim != 2 or prompt.shape[1] < 1 or prompt.shape[0] < 1:
        raise error(f"prompt must have >= 1 token (shape [batch, tokens]), got shape {prompt.shape}")
    T = prompt.shape[1]
    if T < min_prompt_tokens:
        raise error(f"prompt has {T} tokens but this partial-prediction model fixes its spatial routing from "
                    f"the first p = {min_prompt_tokens} tokens: give a prompt of at least {min_prompt_tokens} tokens")
    if T >= max_seq_len:
        raise error(f"prompt has {T} tokens: max_seq_len {max_seq_len} leaves no room to generate")
    check_vocab(prompt, vocab_size, error)


@dataclass(frozen=True)
class Token:
    """One generated position of ``sample_tokens``.

    index: 0-based number of this new token; ids [B] int64: the chosen id of every row; live [B] bool:
    rows that take it (False: the row already ended at its EOS); logits [B, V]: what the choice was
    made from; stop: None, or why generation ends after this token (one of STOP_REASONS)."""

    index: int
    ids: np.ndarray
    live: np.ndarray
    logits: np.ndarray
    stop: str | None


def sample_tokens(logits: np.ndarray, step: Callable[[np.ndarray, int], np.ndarray], position: int, *,
                  max_new_tokens: int, temperature: float, top_k: int | None, seed: int,
                  eos_token_id: int | None, max_seq_len: int, stop_on_eos: bool = True) -> Iterator[Token]:
    """Choose tokens until a stop rule fires, yielding each as it is chosen (streaming).

    logits [B, V]: the prefill's last-position logits; position: the prompt length (where the first
    new token sits); step(ids [B, 1] int64, position) -> logits [B, V] of the token at ``position``.
    The step for a token runs only after its ``Token`` was consumed, and never after the last one.
    Stops (checked in this order) when every row has produced EOS (``stop_on_eos`` and the vocabulary
    has one), after ``max_new_tokens``, or when the token just chosen fills the window (index
    max_seq_len - 1). One ``np.random.default_rng(seed)`` draws for all rows and steps."""
    rng = np.random.default_rng(seed)
    done = np.zeros(logits.shape[0], dtype=bool)
    pos = position
    for i in range(max_new_tokens):
        nxt = choose(logits, temperature, top_k, rng)
        live = ~done
        if stop_on_eos and eos_token_id is not None:
            done = done | (live & (nxt == eos_token_id))
        if done.all():
            stop = STOP_EOS
        elif i == max_new_tokens - 1:
            stop = STOP_MAX_NEW
        elif pos + 1 >= max_seq_len:  # the token just chosen sits at index pos: the window is full
            stop = STOP_MAX_SEQ
        else:
            stop = None
        yield Token(i, nxt, live, logits, stop)
        if stop is not None:
            return
        logits = step(nxt[:, None], pos)
        pos += 1
