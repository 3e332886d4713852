"""``<name>_sequence``: decode_seq.onnx under Triton's sequence batcher with implicit state.

Triton's sequence batcher (``oldest`` strategy) batches requests of *different* sequences into one
execution (at most one request per sequence per batch, equal shapes only). With implicit state
(``sequence_batching { state [...] }``) Triton keeps each sequence's state itself: on a request with
the START flag the state inputs are the configured initial state (here zeros), afterwards they are
the output state of the same correlation id's previous request; inside a batch every slot carries
its own sequence's state. decode.onnx cannot run there (one scalar position for the whole batch),
so the export's ``decode_seq.onnx`` is deployed instead: ``position`` [B, 1] is itself implicit
state (``new_position`` = position + S), every ``state.blocks.{i}`` too, and the START control input
makes a starting row use position 0. The client sends only ``input_ids`` [1, S] per request (a
prompt with START, then one token per request) with its sequence id; the response is ``logits``.

The config written here is Triton's own ``ModelConfig`` protobuf (``model_config``: tritonclient's
``model_config_pb2`` + ``text_format``). This machine's tritonserver has no
onnxruntime backend, so ``SequenceBatcherSim`` reproduces the batcher's implicit-state rules
in-process around the deployed ``model.onnx`` (ONNX Runtime), for the tests and for
``simulate_generation``. With ``--backend python`` the same ``<name>_sequence`` (same client
protocol) runs under Triton's real sequence batcher with START / END / CORRID control inputs and
``python_sequence_model.py``, which keeps the states per correlation id itself.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..artifacts import TRITON_MODEL_FILE
from ..errors import InputError, SMLPError
from . import model_config as mc
from .model_config import parse_config  # noqa: F401 - the simulation and its tests read configs with it

# defaults for `smlp deploy` (the sequence model): batch of up to 8 sequences (preferred: half and
# all of it), up to 64 sequences in flight per instance, 1 ms of queue delay to let a batch fill
SEQUENCE_DEFAULTS: dict[str, Any] = {"max_batch_size": 8, "max_candidate_sequences": 64,
                                     "preferred_batch_sizes": None, "max_queue_delay_us": 1000,
                                     # evicts abandoned sequences: docs/decode.md, "Open sequences"
                                     "max_sequence_idle_us": 5_000_000}


def check_sequence_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults; one-line SMLPError for anything Triton would refuse at load time."""
    unknown = set(opts) - set(SEQUENCE_DEFAULTS)
    if unknown:
        raise SMLPError(f"unknown sequence batching option(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in opts.items() if v is not None}
    o = {**SEQUENCE_DEFAULTS, **given}
    mb = mc.check_range("--sequence-batch", o["max_batch_size"], 1, mc.INT32_MAX)
    cand = mc.check_range("--sequence-candidates", given.get(
        "max_candidate_sequences", max(SEQUENCE_DEFAULTS["max_candidate_sequences"], mb)), 1, mc.INT32_MAX)
    mc.check_range("--sequence-idle-us", o["max_sequence_idle_us"], 1, mc.MAX_IDLE_US)
    mc.check_range("sequence max_queue_delay_us", o["max_queue_delay_us"], 0, mc.INT32_MAX)
    if cand < mb:
        raise SMLPError(f"max_candidate_sequences ({cand}) must be >= the sequence max_batch_size ({mb})")
    if o["preferred_batch_sizes"] is None:  # half and all of the batch (a half of 1 is no preference)
        pref = sorted({x for x in (mb // 2, mb) if x >= 2} or {1})
    else:
        pref = sorted({int(x) for x in o["preferred_batch_sizes"]})
        if not pref or pref[0] < 1 or pref[-1] > mb:
            raise SMLPError(f"preferred batch sizes must lie in [1, max_batch_size {mb}], got {list(o['preferred_batch_sizes'])}")
    return {**o, "max_batch_size": mb, "max_candidate_sequences": cand, "preferred_batch_sizes": tuple(pref)}


def sequence_config(name: str, section: dict[str, Any], inputs: list[dict], outputs: list[dict], *,
                    instances: int, kind: str, intra_op_threads: int, options: dict[str, Any] | None = None,
                    backend: str = "onnxruntime", min_prompt_tokens: int = 1) -> Any:
    """Triton ``ModelConfig`` (protobuf) for decode_seq.onnx under the sequence batcher.

    onnxruntime backend: implicit state (Triton keeps position and states), control input START.
    python backend (Triton's python backend has no implicit state): control inputs START, END and
    CORRID; the model (``python_sequence_model.py``) keeps the state per correlation id itself.
    section: ``manifest["decode"]["sequence"]`` (I/O names); inputs / outputs: ``triton.graph_io``
    of the file (dims with the batch axis first, which Triton's config leaves out)."""
    o = check_sequence_options(options or {})
    ins, outs = section["inputs"], section["outputs"]
    by_in = {t["name"]: t for t in inputs}
    by_out = {t["name"]: t for t in outputs}
    for t in (*inputs, *outputs):
        if not t["dims"] or t["dims"][0] != -1:
            raise SMLPError(f"{section['file']}: {t['name']} has no dynamic batch axis first (dims {t['dims']})")
    control = ins["start"]
    if by_in[control]["data_type"] != "TYPE_INT32" or by_in[control]["dims"][1:] != [1]:
        raise SMLPError(f"{section['file']}: control input {control} must be int32 [batch, 1]")

    pb = mc.pb()
    dtype = pb.DataType.Value
    cfg = mc.new_config(name, backend=backend, max_batch_size=o["max_batch_size"])
    t = by_in[ins["input_ids"]]
    mc.add_tensor(cfg.input, t["name"], t["data_type"], t["dims"][1:])
    t = by_out[outs["logits"]]
    mc.add_tensor(cfg.output, t["name"], t["data_type"], t["dims"][1:])
    if backend == "python":
        mc.add_tensor(cfg.output, "batch_rows", "TYPE_INT32", [1])
    sb = cfg.sequence_batching
    sb.max_sequence_idle_microseconds = o["max_sequence_idle_us"]
    sb.oldest.max_candidate_sequences = o["max_candidate_sequences"]
    sb.oldest.preferred_batch_size.extend(o["preferred_batch_sizes"])
    sb.oldest.max_queue_delay_microseconds = o["max_queue_delay_us"]
    kinds = pb.ModelSequenceBatching.Control.Kind

    def flag(tensor_name: str, kind: str) -> None:
        sb.control_input.add(name=tensor_name).control.add(kind=kinds.Value(kind), int32_false_true=[0, 1])

    flag(control, "CONTROL_SEQUENCE_START")
    params: dict[str, Any] = {"intra_op_thread_count": intra_op_threads}
    if backend == "python":
        flag("END", "CONTROL_SEQUENCE_END")
        sb.control_input.add(name="CORRID").control.add(kind=kinds.Value("CONTROL_SEQUENCE_CORRID"),
                                                         data_type=dtype("TYPE_UINT64"))
        params["min_prompt_tokens"] = int(min_prompt_tokens)
    else:
        for i_name, o_name in [(ins["position"], outs["position"]), *zip(ins["states"], outs["states"])]:
            t = by_in[i_name]
            if by_out[o_name]["dims"] != t["dims"] or by_out[o_name]["data_type"] != t["data_type"]:
                raise SMLPError(f"{section['file']}: state {i_name} -> {o_name} changes shape or type")
            if any(d < 0 for d in t["dims"][1:]):
                raise SMLPError(f"{section['file']}: state {i_name} has a dynamic axis besides the batch: {t['dims']}")
            st = sb.state.add(input_name=i_name, output_name=o_name, data_type=dtype(t["data_type"]),
                              dims=t["dims"][1:])
            st.initial_state.add(data_type=dtype(t["data_type"]), dims=t["dims"][1:], zero_data=True,
                                 name=f"zero {i_name}")
    mc.add_instances(cfg, instances, kind)
    mc.set_parameters(cfg, params)
    return cfg


# ---- in-process stand-in for the sequence batcher ------------------------------------------------
_NP = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32,
       "TYPE_BOOL": np.bool_, "TYPE_FP64": np.float64}


@dataclass
class Request:
    """One inference request of a sequence: inputs [1, ...] per config input; flags as Triton's."""

    corrid: int
    inputs: dict[str, np.ndarray]
    start: bool = False
    end: bool = False
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None
    batch_size: int = 0  # size of the execution it ran in
    slot: int = -1


@dataclass
class SequenceBatcherSim:
    """Triton's sequence batcher (oldest strategy) with implicit state, run in-process around the
    deployed model (``REPO/<name>_sequence``: its config.pbtxt parsed with Triton's schema, its
    ``1/model.onnx`` in ONNX Runtime). Rules reproduced (Triton docs "Implicit State Management",
    core's sequence_batch_scheduler):

    - requests must have batch size 1; a sequence's first request carries START, and a request of
      an unknown sequence without START is refused;
    - a batch takes the oldest pending requests, at most one per sequence, of equal input shapes, up
      to max_batch_size, and a sequence's requests run in arrival order;
    - per slot the state inputs are the initial state (zeros, ``dims``) on START, else the state
      outputs of the same correlation id's previous request; the control input START is the
      configured true/false value per slot; after the run each slot's output states become its
      sequence's state (freed on END); responses carry only the configured outputs.
    """

    model_dir: Path
    threads: int = 1
    log: list[dict[str, Any]] = field(default_factory=list)  # per execution: batch size, corrids, positions

    def __post_init__(self) -> None:
        from smlp_export.runners.ort_session import create_session

        self.model_dir = Path(self.model_dir)
        cfg = self.config = parse_config((self.model_dir / "config.pbtxt").read_text())
        from tritonclient.grpc import model_config_pb2 as mc

        dt = mc.DataType.Name
        sb = cfg.sequence_batching
        if cfg.max_batch_size < 1 or not sb.HasField("oldest") or not sb.state:
            raise SMLPError(f"{self.model_dir}: not an oldest-strategy sequence model with implicit state")
        self.max_batch = cfg.max_batch_size
        self.inputs = {t.name: (tuple(t.dims), _NP[dt(t.data_type)]) for t in cfg.input}
        self.outputs = [t.name for t in cfg.output]
        self.states = [(s.input_name, s.output_name, _NP[dt(s.data_type)], tuple(s.dims),
                        tuple(s.initial_state[0].dims) if s.initial_state else None) for s in sb.state]
        self.controls = []  # (name, dtype, false, true) for START
        for ci in sb.control_input:
            for c in ci.control:
                if mc.ModelSequenceBatching.Control.Kind.Name(c.kind) != "CONTROL_SEQUENCE_START":
                    raise SMLPError(f"{self.model_dir}: the simulation implements only CONTROL_SEQUENCE_START")
                if c.int32_false_true:
                    self.controls.append((ci.name, np.int32, *c.int32_false_true))
                elif c.fp32_false_true:
                    self.controls.append((ci.name, np.float32, *c.fp32_false_true))
                else:
                    self.controls.append((ci.name, np.bool_, *c.bool_false_true))
        self.session = create_session(self.model_dir / "1" / TRITON_MODEL_FILE, intra_op_threads=self.threads)
        self.store: dict[int, dict[str, np.ndarray]] = {}  # corrid -> its state inputs for the next request
        self.queue: deque[Request] = deque()
        self.active: set[int] = set()  # sequences started (START seen) and not ended

    def enqueue(self, req: Request) -> Request:
        """Accept (or refuse, setting ``req.error``, as Triton answers at enqueue time) one request."""
        for name, (dims, dtype) in self.inputs.items():
            x = req.inputs.get(name)
            if x is None:
                req.error = f"expected input '{name}'"
                return req
            if x.shape[0] != 1:
                req.error = "inference request must specify batch-size 1 due to requirements of sequence batcher"
                return req
            if len(dims) != x.ndim - 1 or any(d != -1 and d != s for d, s in zip(dims, x.shape[1:])) or x.dtype != dtype:
                req.error = f"input '{name}' has shape {list(x.shape)} / {x.dtype}, config says [1] + {list(dims)} / {np.dtype(dtype)}"
                return req
        if not req.start and req.corrid not in self.active:
            req.error = (f"inference request for sequence {req.corrid} must specify the START flag on the first "
                         "request of the sequence")
            return req
        if req.start:
            self.active.add(req.corrid)
        if req.end:
            self.active.discard(req.corrid)
        self.queue.append(req)
        return req

    def _state_for(self, req: Request, slot: int, batch: list[Request]) -> dict[str, np.ndarray]:
        """The state inputs of one slot: initial state on START, else the sequence's stored state."""
        if req.start:  # zero_data initial state; without one Triton passes uninitialised memory (NaN here)
            return {i: np.zeros((1, *init), dtype=dtype) if init is not None
                    else np.full((1, *dims), np.nan if np.issubdtype(dtype, np.floating) else 12345, dtype=dtype)
                    for i, _, dtype, dims, init in self.states}
        return self.store[req.corrid]

    def execute(self) -> list[Request]:
        """Form and run one batch (oldest strategy); returns its requests with outputs or error."""
        if not self.queue:
            return []
        batch: list[Request] = []
        seen: set[int] = set()
        shape = None
        for req in self.queue:
            if req.corrid in seen:  # one request per sequence per batch; later ones of it wait
                continue
            seen.add(req.corrid)
            sh = {k: v.shape for k, v in req.inputs.items()}
            if shape is None:
                shape = sh
            if sh == shape and len(batch) < self.max_batch:
                batch.append(req)
        for req in batch:
            self.queue.remove(req)
        feeds = {name: np.concatenate([r.inputs[name] for r in batch]) for name in self.inputs}
        slot_states = [self._state_for(r, j, batch) for j, r in enumerate(batch)]
        for i, _, _, _, _ in self.states:
            feeds[i] = np.concatenate([s[i] for s in slot_states])
        for name, dtype, false, true in self.controls:
            feeds[name] = np.array([[true if r.start else false] for r in batch], dtype=dtype)
        names = self.outputs + [o for _, o, _, _, _ in self.states]
        try:
            res = dict(zip(names, self.session.run(names, feeds)))
        except Exception as e:  # one error response per request of the batch, as the backend does
            for r in batch:
                r.error = str(e).splitlines()[0]
            return batch
        self.log.append({"batch_size": len(batch), "corrids": [r.corrid for r in batch],
                         "shape": {k: list(v) for k, v in shape.items()},
                         "positions": [int(x) for x in np.asarray(feeds.get("position", np.zeros((0, 1))))[:, 0]]
                         if "position" in feeds else []})
        for j, r in enumerate(batch):
            r.outputs = {n: res[n][j:j + 1] for n in self.outputs}
            r.batch_size, r.slot = len(batch), j
            if r.end:
                self.store.pop(r.corrid, None)
            else:
                self.store[r.corrid] = {i: res[o][j:j + 1].copy() for i, o, _, _, _ in self.states}
        return batch


def simulate_generation(model_dir: str | Path, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                        arrivals: Sequence[int] | None = None, min_prompt_tokens: int = 1,
                        max_seq_len: int | None = None, sim: SequenceBatcherSim | None = None
                        ) -> tuple[list[list[int]], SequenceBatcherSim]:
    """Greedy generation for many sequences at once through ``SequenceBatcherSim``.

    Sequence i (correlation id i + 1) sends its prompt with START at tick ``arrivals[i]`` (default
    0), then one request per chosen token (END on the last), as a Triton client would. Each tick,
    every client with a request ready enqueues it, and the batcher runs batches until its queue is
    empty; so prefill requests of equal length batch together and all decode steps of the live
    sequences batch together, each row at its own position. Returns (new tokens per sequence, sim).
    """
    sim = sim or SequenceBatcherSim(Path(model_dir))
    arrivals = list(arrivals or [0] * len(prompts))
    for p in prompts:  # the graph cannot check these (no errors in ONNX): the client does
        if len(p) < min_prompt_tokens:
            raise InputError(f"prompt has {len(p)} tokens, this model needs at least {min_prompt_tokens}")
        if max_seq_len is not None and len(p) + max_new_tokens > max_seq_len:
            raise InputError(f"prompt of {len(p)} + {max_new_tokens} new tokens exceeds max_seq_len {max_seq_len}")
    out: list[list[int]] = [[] for _ in prompts]
    ready: dict[int, Request] = {}  # each client's next request, sent at the next tick
    tick = 0
    while any(len(o) < max_new_tokens for o in out):
        for i, p in enumerate(prompts):
            if arrivals[i] == tick:
                ready[i] = Request(i + 1, {"input_ids": np.asarray(p, dtype=np.int64)[None]}, start=True,
                                   end=max_new_tokens == 1)
        for i in sorted(ready):
            r = sim.enqueue(ready.pop(i))
            if r.error:
                raise SMLPError(f"sequence {r.corrid}: {r.error}")
        while sim.queue:
            for r in sim.execute():
                if r.error:
                    raise SMLPError(f"sequence {r.corrid}: {r.error}")
                i = r.corrid - 1
                out[i].append(int(r.outputs["logits"][0, -1].argmax()))
                k = len(out[i])
                if k < max_new_tokens:
                    ready[i] = Request(i + 1, {"input_ids": np.array([[out[i][-1]]], dtype=np.int64)},
                                       end=k + 1 == max_new_tokens)
        tick += 1
    return out, sim
