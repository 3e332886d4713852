"""The full-sequence model for Triton's python backend, written by ``smlp deploy --backend python``.

This file is copied verbatim into the model repository as ``<name>/1/model.py``. It must stay
self-contained (numpy, onnxruntime, the standard library and Triton's ``triton_python_backend_utils``
only): the repository has to run in an NGC Triton container where smlp_export is not installed. The
limits it checks come from ``smlp_model.json`` next to it, written from the export's manifest.

Dynamic batching: Triton's dynamic batcher hands ``execute`` several requests at once, each with its
own ``input_ids`` [b_i, T_i]. Requests are validated one by one (a bad one gets an error response, the
others are still served), then run together: right-padded to the longest length and concatenated on
the batch axis, one ONNX Runtime call, and each response cut back to its own rows and T_i positions.
Right padding is exact for an sMLP because every layer is causal: position t only reads positions
<= t (spatial products are lower-triangular; token routing, LayerNorms and FFNs are per position).
The one exception is partial-prediction spatial routing, which routes each channel from the first
p = ceil(partial_fraction * n) positions (zero rows when T < p): a request shorter than p would see
padding tokens there. So requests with T_i >= ``min_pad_tokens`` (p, or 1) are padded together (within
power-of-two length buckets) and shorter ones are only batched with requests of exactly their length.
"""
from __future__ import annotations

import json
import os

import numpy as np

try:  # present inside Triton's python backend stub only
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by smlp_export's tests for the pure functions below
    pb_utils = None

LIMITS_FILE = "smlp_model.json"
PAD_ID = 0  # any valid token id: padded positions never reach the kept outputs


def check_request(ids: np.ndarray, limits: dict) -> str | None:
    """One-line reason why ``input_ids`` cannot be served, or None when it can."""
    if ids.dtype != np.int64:
        return f"input_ids must be INT64, got {ids.dtype}"
    if ids.ndim != 2:
        return f"input_ids must have shape [batch, tokens], got shape {list(ids.shape)}"
    if ids.shape[0] < 1:
        return "input_ids has an empty batch (0 rows)"
    if ids.shape[1] < 1:
        return "empty prompt: input_ids has 0 tokens"
    n, vocab = int(limits["max_seq_len"]), int(limits["vocab_size"])
    if ids.shape[1] > n:
        return f"input_ids has {ids.shape[1]} tokens, longer than the model's max_seq_len {n}"
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        return f"token id {hi if hi >= vocab else lo} outside the vocabulary [0, {vocab})"
    return None


def plan_groups(lengths: list[int], min_pad_tokens: int) -> list[list[int]]:
    """Indices of requests that run together, longest group first.

    Requests with T >= ``min_pad_tokens`` are right-padded together within power-of-two length
    buckets ((64, 128], (32, 64], ...), so padding at most doubles a request's work: padding a
    5-token request to 128 would cost more than the batching saves. Shorter requests (partial-
    prediction routing, see the module docstring) are grouped by exact length, never padded.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(lengths):
        key = (0, (t - 1).bit_length()) if t >= min_pad_tokens else (1, t)
        groups.setdefault(key, []).append(i)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], -k[1]))]


def run_group(run, arrays: list[np.ndarray], output_names: list[str]) -> list[list[np.ndarray]]:
    """Run requests [b_i, T_i] as one right-padded batch; per request, its outputs [b_i, T_i, ...].

    ``run(ids [sum b_i, max T_i]) -> list of outputs [sum b_i, max T_i, ...]`` in ``output_names`` order.
    """
    T = max(a.shape[1] for a in arrays)
    batch = np.full((sum(a.shape[0] for a in arrays), T), PAD_ID, dtype=np.int64)
    row = 0
    spans = []
    for a in arrays:
        batch[row:row + a.shape[0], :a.shape[1]] = a
        spans.append((row, row + a.shape[0], a.shape[1]))
        row += a.shape[0]
    values = run(batch)
    if len(values) != len(output_names):
        raise RuntimeError(f"the session returned {len(values)} outputs, expected {len(output_names)}")
    # copies: a response must not keep the whole padded batch alive
    return [[np.ascontiguousarray(v[r0:r1, :t]) for v in values] for r0, r1, t in spans]


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        here = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(here, LIMITS_FILE)) as f:
            self.limits = json.load(f)
        config = json.loads(args["model_config"])
        # Not smlp_export.runners.ort_session.create_session: this file runs inside tritonserver, where
        # smlp_export is not installed (docs/architecture.md).
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(config.get("parameters", {}).get("intra_op_thread_count", {})
                                        .get("string_value", "0"))
        providers: list = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args.get("model_instance_device_id", "0"))
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device}))
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), opts, providers=providers)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.min_pad_tokens = int(self.limits.get("min_pad_tokens", 1))

    def _run(self, ids: np.ndarray) -> list:
        return self.session.run(self.outputs, {"input_ids": ids})

    def execute(self, requests):
        responses: list = [None] * len(requests)
        arrays: dict[int, np.ndarray] = {}
        for i, request in enumerate(requests):
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
            problem = check_request(ids, self.limits)
            if problem is not None:  # this request only: the others in the batch are still served
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(problem))
            else:
                arrays[i] = ids
        order = list(arrays)
        for group in plan_groups([arrays[i].shape[1] for i in order], self.min_pad_tokens):
            idx = [order[j] for j in group]
            try:
                results = run_group(self._run, [arrays[i] for i in idx], self.outputs)
            except Exception as e:  # one clear error per request, never a crashed server
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                for i in idx:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))
                continue
            for i, values in zip(idx, results):
                responses[i] = pb_utils.InferenceResponse(
                    [pb_utils.Tensor(n, v) for n, v in zip(self.outputs, values)])
        return responses
