"""Triton python-backend model: decode_seq.onnx under Triton's sequence batcher (``smlp deploy --backend python``
copies this file as ``<name>_sequence/1/model.py``; it runs inside tritonserver, not in this package).

The python backend has no implicit state, so this model keeps each sequence's position and spatial
states itself, keyed by the CORRID control input: zeros on START, the previous request's outputs
after, dropped on END. The requests of one ``execute`` (the oldest strategy batches requests of
different sequences) run as one ONNX Runtime batch per input shape, each row at its own position.
The client protocol is the onnxruntime-backend ``<name>_sequence``'s: ``input_ids`` [1, S] with a
sequence id -> ``logits`` [1, S, V]. Unlike the graph, this model refuses bad requests with one clear
error each (token out of the vocabulary, past max_seq_len, a prompt shorter than p, no START).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        here = os.path.join(args["model_repository"], args["model_version"])
        # Not smlp_export.runners.ort_session.create_session: this file runs inside tritonserver, where
        # smlp_export is not installed (docs/architecture.md).
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_thread_count", "0"))
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
        ins = [i for i in self.session.get_inputs() if i.name.startswith("state.")]
        self.states = [i.name for i in ins]
        self.shapes = [(tuple(i.shape[1:]), _TYPES[i.type]) for i in ins]
        self.outputs = ["logits", "new_position"] + ["new_" + s for s in self.states]
        self.max_seq_len = int(self.shapes[0][0][0])
        self.vocab = int(self.session.get_outputs()[0].shape[-1])
        self.min_prompt = int(params.get("min_prompt_tokens", "1"))
        self.store = {}  # correlation id -> (position [1, 1], [state [1, n, c], ...])
        # A client that vanishes without END leaves its state here. Triton releases such a sequence
        # after max_sequence_idle_microseconds (its next request must START again), so the state is
        # dead then: drop it, or memory grows by one state per abandoned sequence.
        idle_us = cfg.get("sequence_batching", {}).get("max_sequence_idle_microseconds") or 1_000_000
        self.idle_s = int(idle_us) / 1e6
        self.last_used = {}  # correlation id -> time.monotonic() of its last request

    @staticmethod
    def _scalar(request, name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return 0 if t is None else int(t.as_numpy().reshape(-1)[0])

    def _check(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        corrid, start, end = (self._scalar(request, n) for n in ("CORRID", "START", "END"))
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [1, new_tokens >= 1], got {list(ids.shape)}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab:
            raise ValueError(f"token id {hi if hi >= self.vocab else lo} outside the vocabulary [0, {self.vocab})")
        if start:
            position = 0
        elif corrid in self.store:
            position = int(self.store[corrid][0][0, 0])
        else:
            raise ValueError(f"sequence {corrid} has no state: its first request must set sequence_start")
        S = ids.shape[1]
        if position + S > self.max_seq_len:
            raise ValueError(f"position {position} + {S} new token(s) = {position + S} exceeds max_seq_len "
                             f"{self.max_seq_len}")
        if position + S < self.min_prompt:
            raise ValueError(f"partial-prediction model: the first request needs at least {self.min_prompt} "
                             f"tokens, got {position + S}")
        return corrid, bool(start), bool(end), ids.astype(np.int64)

    def _drop_idle(self, now):
        stale = [c for c, t in self.last_used.items() if now - t > self.idle_s]
        for c in stale:
            self.store.pop(c, None)
            self.last_used.pop(c, None)
        if stale:
            pb_utils.Logger.log_info(f"smlp sequence model: dropped the state of {len(stale)} sequence(s) idle "
                                     f"for more than {self.idle_s:g} s without END")

    def execute(self, requests):
        self._drop_idle(time.monotonic())
        responses = [None] * len(requests)
        pending = []
        for k, request in enumerate(requests):
            try:
                pending.append((k, *self._check(request)))
            except ValueError as e:  # one clear error for this request; the others still run
                responses[k] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        while pending:  # one run per input shape, at most one request per sequence
            group, rest, seen = [], [], set()
            for item in pending:
                if item[4].shape == pending[0][4].shape and item[1] not in seen:
                    group.append(item)
                    seen.add(item[1])
                else:
                    rest.append(item)
            self._run(group, responses)
            pending = rest
        return responses

    def _run(self, group, responses):
        pos, parts = [], [[] for _ in self.states]
        for _, corrid, start, _, _ in group:
            if start:
                p0, st = np.zeros((1, 1), np.int64), [np.zeros((1, *sh), dt) for sh, dt in self.shapes]
            else:
                p0, st = self.store[corrid]
            pos.append(p0)
            for i, s in enumerate(st):
                parts[i].append(s)
        feeds = {"input_ids": np.concatenate([g[4] for g in group]), "position": np.concatenate(pos),
                 "START": np.array([[1 if g[2] else 0] for g in group], dtype=np.int32)}
        feeds.update({name: np.concatenate(p) for name, p in zip(self.states, parts)})
        try:
            out = self.session.run(self.outputs, feeds)
        except Exception as e:  # noqa: BLE001 - one error response per request, never a crashed server
            for g in group:
                responses[g[0]] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e).splitlines()[0]))
            return
        for j, (k, corrid, _, end, _) in enumerate(group):
            if end:
                self.store.pop(corrid, None)
                self.last_used.pop(corrid, None)
            else:
                self.store[corrid] = (out[1][j:j + 1].copy(), [o[j:j + 1].copy() for o in out[2:]])
                self.last_used[corrid] = time.monotonic()
            # batch_rows: how many sequences this ONNX Runtime run stepped together (observability)
            responses[k] = pb_utils.InferenceResponse([
                pb_utils.Tensor("logits", out[0][j:j + 1]),
                pb_utils.Tensor("batch_rows", np.array([[len(group)]], dtype=np.int32))])
