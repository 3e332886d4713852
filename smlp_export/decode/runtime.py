"""Token-by-token generation over a decode step: PyTorch (cache or full recompute) and ONNX Runtime.

Every backend is a ``Generator`` with two small methods (``_reset(batch)``, ``_step(ids, position)
-> logits``); the loop (greedy / temperature / top-k sampling with a seed, EOS and max_seq_len
stops, streaming callback, timings) lives once in ``Generator.generate``:

- ``TorchGenerator(model)``: ``state.step`` with the spatial-state cache;
- ``TorchFullGenerator(model)``: recomputes the whole prefix each token (the parity oracle and the
  benchmark baseline);
- ``OrtGenerator(export_dir)``: ``decode.onnx`` in ONNX Runtime with IO binding. Each state lives in
  one preallocated buffer (numpy array wrapped as an ``OrtValue`` without a copy) bound as the
  input ``state.blocks.i`` *and* the output ``new_state.blocks.i``. ONNX Runtime then writes the
  ScatterND result straight into that buffer, and its CPU ScatterND skips the initial copy when
  input and output are the same memory, so a step writes only the S new rows
  (``state_mode="inplace"``, the default; see docs/decode.md for what was measured). The graph
  reads the old state only through that ScatterND, so the aliasing is safe; parity tests check it.
  ``state_mode="copy"`` lets ONNX Runtime allocate fresh outputs each step (for comparison).

Thread safety: one generator may be called from many threads at once. ``generate`` keeps all of a
call's mutable state (states, IO binding, buffers, the token prefix) in a per-call *stream* object
returned by ``_reset``; the generator itself only holds read-only things (the model, the ONNX
Runtime session, whose ``run`` / ``run_with_iobinding`` are thread-safe). ``OrtDecoder.bind`` +
``step_bound`` (one default stream on the decoder) are the single-threaded low-level API.

Sampling happens in numpy float64 on float32 logits, so two backends with equal logits draw the
same tokens for the same seed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..artifacts import DECODE_FILE, Manifest, is_export_dir
from ..errors import InputError, SMLPError
# the checks, the token choice and the stop rules live in one self-contained module that the served
# <name>_generate model (Triton python backend) runs too: re-exported here
from ..sampling import (STOP_EOS, STOP_MAX_NEW, STOP_MAX_SEQ, check_ids, check_options,  # noqa: F401
                        check_position, check_prompt, check_states, check_vocab, choose, sample_tokens, softmax64)

STOP_MESSAGES = {
    STOP_EOS: "stopped at the end-of-sequence token",
    STOP_MAX_NEW: "stopped after --max-new-tokens tokens",
    STOP_MAX_SEQ: "stopped: the sequence reached max_seq_len {n} (the model's whole context window; "
                  "an sMLP's spatial weights have no positions beyond it)",
}


@dataclass(frozen=True)
class ModelLimits:
    """What a generator needs to know about its model."""

    vocab_size: int
    max_seq_len: int
    eos_token_id: int | None
    min_prompt_tokens: int = 1  # partial-prediction models: p

    @classmethod
    def of_config(cls, cfg) -> "ModelLimits":
        return cls(cfg.vocab_size, cfg.max_seq_len, cfg.eos_token_id, max(1, cfg.prefix_len))


@dataclass
class GenerationResult:
    """tokens: new ids per batch row (a row stops at its EOS, which is included).
    step_logits: when recorded, [n_steps] arrays of [B, V] float32 (the logits each choice used)."""

    prompt_len: int
    tokens: list[list[int]]
    stop_reason: str
    prefill_s: float
    decode_s: float
    n_decode_steps: int
    step_logits: list[np.ndarray] = field(default_factory=list)
    max_seq_len: int = 0

    @property
    def n_new(self) -> int:
        return max((len(t) for t in self.tokens), default=0)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second over the whole call (prefill included)."""
        total = self.prefill_s + self.decode_s
        return self.n_new / total if total > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the incremental steps alone (one token each)."""
        return self.n_decode_steps / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def stop_message(self) -> str:
        return STOP_MESSAGES[self.stop_reason].format(n=self.max_seq_len)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_len, "new_tokens": self.n_new, "tokens": self.tokens,
                "stop_reason": self.stop_reason, "stop_message": self.stop_message,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "tokens_per_s": self.tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s}


class Generator:
    """Backend-independent generation loop; subclasses implement ``_reset`` and ``_step``."""

    name = "generator"
    limits: ModelLimits

    def _reset(self, batch: int) -> Any:
        """A fresh per-call stream (everything one generation mutates) for ``batch`` rows."""
        raise NotImplementedError

    def _step(self, stream: Any, ids: np.ndarray, position: int) -> np.ndarray:
        """ids [B, S] int64 at positions [position, position + S) of ``stream`` -> logits [B, S, V] float32."""
        raise NotImplementedError

    def warmup(self) -> None:
        """One untimed throwaway step (lazy initialisation: torch's first custom-op call, ORT's arena),
        so the timings of the next ``generate`` measure generation, not start-up."""
        self._step(self._reset(1), np.zeros((1, self.limits.min_prompt_tokens), dtype=np.int64), 0)

    def check_prompt(self, prompt: np.ndarray) -> None:
        lim = self.limits
        check_prompt(prompt, vocab_size=lim.vocab_size, max_seq_len=lim.max_seq_len,
                     min_prompt_tokens=lim.min_prompt_tokens, error=InputError)

    def generate(self, prompt: Sequence[int] | Sequence[Sequence[int]] | np.ndarray, max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int | None = None, seed: int = 0, stop_on_eos: bool = True,
                 on_token: Callable[[int, np.ndarray], None] | None = None,
                 record_logits: bool = False) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``prompt`` (ids [T] or [B, T], equal lengths).

        temperature 0 = greedy. ``on_token(i, ids[B])`` is called as each token is chosen
        (streaming). Stops when every row has produced EOS (if ``stop_on_eos``), after
        ``max_new_tokens``, or when the sequence fills max_seq_len.
        """
        check_options(max_new_tokens, temperature, top_k, seed, error=InputError)
        ids = np.asarray(prompt, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        self.check_prompt(ids)
        B, T = ids.shape
        lim = self.limits
        out: list[list[int]] = [[] for _ in range(B)]
        recorded: list[np.ndarray] = []
        stream = self._reset(B)  # per call: concurrent generate() calls never share mutable state
        t0 = time.perf_counter()
        logits = self._step(stream, ids, 0)[:, -1]
        prefill = time.perf_counter() - t0
        n_steps, reason = 0, STOP_MAX_NEW
        t1 = time.perf_counter()
        for tok in sample_tokens(logits, lambda nxt, pos: self._step(stream, nxt, pos)[:, -1], T,
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                                 eos_token_id=lim.eos_token_id, max_seq_len=lim.max_seq_len,
                                 stop_on_eos=stop_on_eos):
            n_steps = tok.index  # steps after the prefill: one per token but the first
            if record_logits:
                recorded.append(np.array(tok.logits, dtype=np.float32))
            for b in np.flatnonzero(tok.live):
                out[b].append(int(tok.ids[b]))
            if on_token is not None:
                on_token(tok.index, tok.ids)
            reason = tok.stop or reason
        return GenerationResult(T, out, reason, prefill, time.perf_counter() - t1, n_steps, recorded, lim.max_seq_len)


# ---- PyTorch ------------------------------------------------------------------------------------
class TorchGenerator(Generator):
    """PyTorch with the spatial-state cache (``state.step``)."""

    name = "torch"

    def __init__(self, model) -> None:
        self.model = model.eval()
        self.limits = ModelLimits.of_config(model.config)

    def _reset(self, batch: int) -> list:
        from .state import init_states

        return [init_states(self.model, batch)]  # a one-item box: _step replaces the states

    def _step(self, stream: list, ids: np.ndarray, position: int) -> np.ndarray:
        import torch

        from .state import step

        logits, stream[0] = step(self.model, torch.from_numpy(ids), position, stream[0])
        return logits.float().numpy()


class TorchFullGenerator(Generator):
    """PyTorch full recompute: every step runs the whole prefix (no cache)."""

    name = "torch-full"

    def __init__(self, model) -> None:
        self.model = model.eval()
        self.limits = ModelLimits.of_config(model.config)

    def _reset(self, batch: int) -> list:
        return [np.zeros((batch, 0), dtype=np.int64)]  # the prefix so far

    def _step(self, stream: list, ids: np.ndarray, position: int) -> np.ndarray:
        import torch

        assert stream[0].shape[1] == position
        stream[0] = np.concatenate([stream[0], ids], axis=1)
        with torch.no_grad():
            logits = self.model(torch.from_numpy(stream[0]))
        return logits[:, position:].float().numpy()


# ---- ONNX Runtime --------------------------------------------------------------------------------
def read_decode_section(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(decode.onnx path, manifest["decode"]) from an export dir (manifest.json) or a decode.onnx
    file (the section is then read from its sibling manifest.json, or inferred from the graph)."""
    path = Path(path)
    if path.is_dir():
        if is_export_dir(path):
            man = Manifest.read(path, required=())  # only the decode section is needed
            if not man.decode:
                raise SMLPError(f"{path} has no decode graph: re-export with `smlp export ... --decode`")
            return man.decode_path(), man.decode
        path = path / DECODE_FILE
    if not path.exists():
        raise SMLPError(f"{path} does not exist: export with `smlp export ... --decode`")
    if is_export_dir(path.parent):
        section = Manifest.read(path.parent, required=()).decode
        if section:
            return path, section
    return path, infer_decode_section(path)


def infer_decode_section(path: Path) -> dict[str, Any]:
    """The manifest section from decode.onnx's own inputs/outputs (for a file without manifest)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    states = [i.name for i in g.input if i.name.startswith("state.")]
    if not states or g.input[0].name != "input_ids":
        raise SMLPError(f"{path} is not a decode graph (no input_ids / state.* inputs)")
    st = next(i for i in g.input if i.name == states[0]).type.tensor_type
    lg = g.output[0].type.tensor_type
    n, c = (d.dim_value for d in st.shape.dim[1:])
    return {"file": path.name, "inputs": {"input_ids": "input_ids", "position": "position", "states": states},
            "outputs": {"logits": "logits", "states": ["new_" + s for s in states]},
            "state_shape": ["batch", n, c],
            "state_dtype": onnx.helper.tensor_dtype_to_np_dtype(st.elem_type).name,
            "max_seq_len": n, "vocab_size": lg.shape.dim[2].dim_value, "eos_token_id": 256,
            "min_prompt_tokens": 1}


class OrtDecoder:
    """One ``decode.onnx`` session. ``run`` is the checked functional step (thread-safe);
    ``new_stream(batch)`` an IO-bound stream that keeps states in preallocated buffers (one per
    thread); ``bind`` + ``step_bound`` the same on one default stream (single-threaded)."""

    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None, threads: int | None = None) -> None:
        from ..quantize import ORT_EXACT_SESSION_CONFIG  # quantized portable graphs: float activations
        from ..runners.ort_session import create_session

        self.path, self.section = read_decode_section(path)
        self.session = create_session(self.path, providers=providers, intra_op_threads=threads or None,
                                      config=ORT_EXACT_SESSION_CONFIG)
        s = self.section
        self.state_names: list[str] = list(s["inputs"]["states"])
        self.state_out_names: list[str] = list(s["outputs"]["states"])
        self.n, self.c = int(s["state_shape"][1]), int(s["state_shape"][2])
        self.state_dtype = np.dtype(s["state_dtype"])
        self.limits = ModelLimits(int(s["vocab_size"]), int(s["max_seq_len"]), s.get("eos_token_id"),
                                  int(s.get("min_prompt_tokens", 1)))
        self._stream: BoundStream | None = None  # bind()'s default stream (single-threaded API)

    # -- checks ------------------------------------------------------------------------------
    def check(self, ids: np.ndarray, position: int, states: Sequence[np.ndarray] | None) -> None:
        """One clear InputError for anything the graph would silently get wrong."""
        lim = self.limits
        B, S = check_ids(ids, vocab_size=lim.vocab_size, dtypes=("int64",), values=False, error=InputError)
        check_position(position, S, max_seq_len=lim.max_seq_len, min_prompt_tokens=lim.min_prompt_tokens,
                       error=InputError)
        check_vocab(ids, lim.vocab_size, InputError)
        if states is not None:
            check_states(states, names=self.state_names, shape=(B, self.n, self.c), dtype=self.state_dtype,
                         error=InputError)

    def init_states(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.n, self.c), dtype=self.state_dtype) for _ in self.state_names]

    # -- functional step ----------------------------------------------------------------------
    def run(self, ids: np.ndarray, position: int, states: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids [B, S] int64, position, states -> (logits [B, S, V] float32, new states). Checked."""
        self.check(ids, position, states)
        feeds = {"input_ids": ids, "position": np.array(position, dtype=np.int64), **dict(zip(self.state_names, states))}
        out = self.session.run(None, feeds)
        return out[0], list(out[1:])

    # -- IO binding ---------------------------------------------------------------------------
    def new_stream(self, batch: int, *, in_place: bool = True) -> "BoundStream":
        """A fresh IO-bound stream (its own binding and state buffers) on this decoder's session.
        Streams are independent: one per thread / per generation, any number at once."""
        return BoundStream(self, batch, in_place=in_place)

    def bind(self, batch: int, *, in_place: bool = True) -> list[np.ndarray]:
        """Single-threaded convenience: make ``new_stream(batch)`` this decoder's default stream
        (used by ``step_bound`` / ``states``) and return its state buffers (numpy arrays sharing
        the memory ONNX Runtime reads and, with ``in_place``, writes)."""
        self._stream = self.new_stream(batch, in_place=in_place)
        return self._stream.buffers

    def step_bound(self, ids: np.ndarray, position: int) -> np.ndarray:
        """One step of the default stream; ids [B, S] int64 -> logits [B, S, V] float32 (checked)."""
        if self._stream is None:
            raise SMLPError("call bind(batch) before step_bound")
        return self._stream.step(ids, position)

    @property
    def _values(self) -> list:
        """The default stream's bound state values (OrtValues)."""
        return self._stream.values if self._stream is not None else []

    def states(self) -> list[np.ndarray]:
        """The current bound state contents of the default stream."""
        return self._stream.states() if self._stream is not None else []


class BoundStream:
    """One generation stream on an ``OrtDecoder``: an IO binding of its own with preallocated zero
    states for ``batch`` rows, bound once with everything that does not change between steps
    (states, position, logits output, a [batch, 1] ids buffer), so a decode step only writes two
    small numpy buffers and runs. Everything mutable lives here, not on the decoder, so streams on
    one session may run concurrently (a single stream is not meant for two threads at once)."""

    def __init__(self, decoder: OrtDecoder, batch: int, *, in_place: bool = True) -> None:
        import onnxruntime as ort

        if batch < 1:
            raise InputError(f"batch must be >= 1, got {batch}")
        self.decoder = decoder
        self.binding = b = decoder.session.io_binding()
        self.buffers = decoder.init_states(batch)
        self.values = [ort.OrtValue.ortvalue_from_numpy(x) for x in self.buffers]  # shares memory (CPU)
        self.in_place = in_place
        self._pos = np.zeros((), dtype=np.int64)
        self._ids1 = np.zeros((batch, 1), dtype=np.int64)
        self._ids1_value = ort.OrtValue.ortvalue_from_numpy(self._ids1)
        self._logits1 = np.zeros((batch, 1, decoder.limits.vocab_size), dtype=np.float32)
        self._logits1_value = ort.OrtValue.ortvalue_from_numpy(self._logits1)
        self._decode_bound = False
        b.bind_ortvalue_input("position", ort.OrtValue.ortvalue_from_numpy(self._pos))
        b.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
        self._bind_states()

    def _bind_states(self) -> None:
        b, d = self.binding, self.decoder
        for name, out_name, v in zip(d.state_names, d.state_out_names, self.values):
            b.bind_ortvalue_input(name, v)
            if self.in_place:
                b.bind_ortvalue_output(out_name, v)  # the same memory: ScatterND writes the new rows only
            else:
                b.bind_output(out_name, "cpu")

    def step(self, ids: np.ndarray, position: int) -> np.ndarray:
        """One step on this stream's states; ids [B, S] int64 -> logits [B, S, V] float32 (checked)."""
        ids = np.asarray(ids)
        if ids.ndim == 2 and ids.shape[0] != self._ids1.shape[0]:
            raise InputError(f"input_ids batch {ids.shape[0]} does not match the bound states' batch {self._ids1.shape[0]}")
        self.decoder.check(ids, position, None)
        b = self.binding
        self._pos[()] = position
        if ids.shape[1] == 1:  # decode: write into bound buffers, no re-binding
            self._ids1[:] = ids
            if not self._decode_bound:
                b.bind_ortvalue_input("input_ids", self._ids1_value)
                # An output bound to "cpu" keeps the first run's shape; decode has its own buffer.
                b.bind_ortvalue_output("logits", self._logits1_value)
                self._decode_bound = True
        else:  # prefill: bind (a copy of) this array and let ORT allocate the logits
            b.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
            b.bind_output("logits", "cpu")
            self._decode_bound = False
        self.decoder.session.run_with_iobinding(b)
        if self.in_place and self._decode_bound:
            return self._logits1.copy()
        outs = b.get_outputs()
        if not self.in_place:
            # ORT allocated new state outputs: they become the next step's inputs (no copy).
            self.values = list(outs[1:])
            self._bind_states()
        return self._logits1.copy() if self._decode_bound else outs[0].numpy()

    def states(self) -> list[np.ndarray]:
        """The current bound state contents."""
        return [v.numpy() for v in self.values]


class OrtGenerator(Generator):
    """``decode.onnx`` in ONNX Runtime with IO-bound, in-place states (see module docstring)."""

    name = "ort"

    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None, threads: int | None = None,
                 state_mode: str = "inplace") -> None:
        if state_mode not in ("inplace", "copy"):
            raise ValueError(f"state_mode must be 'inplace' or 'copy', got {state_mode!r}")
        self.decoder = OrtDecoder(path, providers=providers, threads=threads)
        self.limits = self.decoder.limits
        self.state_mode = state_mode

    def _reset(self, batch: int) -> BoundStream:
        return self.decoder.new_stream(batch, in_place=self.state_mode == "inplace")

    def _step(self, stream: BoundStream, ids: np.ndarray, position: int) -> np.ndarray:
        return stream.step(ids, position)
