"""Triton python-backend model that streams generated tokens: copied as ``model.py`` into
``REPO/<name>_generate/1/`` by ``smlp_export.deploy.generate_model``. Not imported by smlp_export.

It runs inside Triton (e.g. the NGC container) where smlp_export is not installed, so it imports only
numpy, onnxruntime, triton_python_backend_utils, the stdlib and ``smlp_sampling.py`` beside it (a
verbatim copy of ``smlp_export/sampling.py``: the checks, token choice and stop rules that
``smlp generate`` runs, so the same seed gives the same tokens), and reads its limits from
``smlp_generate.json`` beside it, never from a path outside the repository.

Decoupled mode: ``execute`` checks each request, answers a bad one with ONE error response
(TritonError, one line) and hands a good one to a worker thread, which streams one response per
token (``token_id`` [1] int64, ``stop_reason`` [1] string: "" until the last response, which
carries "eos" / "max_new_tokens" / "max_seq_len" and the final flag). Every generation keeps its
own spatial state (numpy arrays fed to and returned by ``session.run``); the only shared object is
the ONNX Runtime session, whose ``run`` is thread-safe, so concurrent streams never share mutable state.
"""
import importlib.util
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

def _load_sampling(here):
    # by path, not sys.path: another model in the same repository may ship its own copy
    spec = importlib.util.spec_from_file_location("smlp_sampling", os.path.join(here, "smlp_sampling.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


class BadRequest(ValueError):
    """Raised for a request the model refuses (answered with one TritonError)."""


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        self.sampling = _load_sampling(here)
        with open(os.path.join(here, "smlp_generate.json")) as f:
            self.spec = json.load(f)
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        # Not smlp_export.runners.ort_session.create_session: this file runs inside tritonserver, where
        # smlp_export is not installed (docs/architecture.md).
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_thread_count", "0") or 0)
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args.get("model_instance_device_id", 0))}))
        self.session = ort.InferenceSession(os.path.join(here, self.spec["file"]), opts, providers=providers)
        s = self.spec
        self.states_in = list(s["state_inputs"])
        self.states_out = list(s["state_outputs"])
        self.outputs = ["logits"] + self.states_out
        self.state_shape = (1, int(s["state_shape"][1]), int(s["state_shape"][2]))
        self.state_dtype = np.dtype(s["state_dtype"])
        # `position` is a scalar in decode.onnx; a graph with a per-sequence position ([B] / [B, 1])
        # gets it in that shape for the one sequence a request carries
        rank = len(next(i for i in self.session.get_inputs() if i.name == "position").shape)
        self.position_shape = (1,) * rank
        self.max_streams = max(1, int(params.get("max_streams", "8") or 8))
        self.pool = ThreadPoolExecutor(max_workers=self.max_streams, thread_name_prefix="smlp_generate")

    # -- one request ---------------------------------------------------------------------------
    def _scalar(self, request, name, kind):
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is None:
            return None
        v = t.as_numpy().reshape(-1)
        if v.size != 1:
            raise BadRequest(f"{name} must hold one value, got {v.size}")
        return kind(v[0])

    def parse(self, request):
        """(prompt [1, T] int64, options) or BadRequest with one line naming what is wrong."""
        s, smp = self.spec, self.sampling
        t = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if t is None:
            raise BadRequest("input_ids (the prompt's token ids) is missing")
        ids = np.asarray(t.as_numpy(), dtype=np.int64).reshape(1, -1)
        if ids.size == 0:
            raise BadRequest("input_ids is empty: give a prompt of at least one token")
        opts = {"max_new_tokens": self._scalar(request, "max_new_tokens", int),
                "temperature": self._scalar(request, "temperature", float),
                "top_k": self._scalar(request, "top_k", int),
                "seed": self._scalar(request, "seed", int),
                "stop_on_eos": self._scalar(request, "stop_on_eos", bool)}
        for k, v in s["defaults"].items():
            if opts[k] is None:
                opts[k] = v
        smp.check_options(opts["max_new_tokens"], opts["temperature"], opts["top_k"], opts["seed"], error=BadRequest)
        smp.check_prompt(ids, vocab_size=s["vocab_size"], max_seq_len=s["max_seq_len"],
                         min_prompt_tokens=s["min_prompt_tokens"], error=BadRequest)
        return ids, opts

    def step(self, ids, position, states):
        """ids [1, S] int64 at [position, position + S) -> (logits [1, V] of the last, new states)."""
        feed = {"input_ids": ids, "position": np.full(self.position_shape, position, dtype=np.int64)}
        feed.update(zip(self.states_in, states))
        out = self.session.run(self.outputs, feed)
        return out[0][:, -1], out[1:]

    def stream(self, request, sender, ids, opts):
        """Generate for one request, one response per token; runs on a worker thread."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            box = [[np.zeros(self.state_shape, dtype=self.state_dtype) for _ in self.states_in]]

            def step(nxt, position):
                logits, box[0] = self.step(nxt, position, box[0])
                return logits

            logits, box[0] = self.step(ids, 0, box[0])
            for tok in self.sampling.sample_tokens(
                    logits, step, ids.shape[1], max_new_tokens=opts["max_new_tokens"],
                    temperature=opts["temperature"], top_k=opts["top_k"], seed=opts["seed"],
                    eos_token_id=self.spec["eos_token_id"], max_seq_len=self.spec["max_seq_len"],
                    stop_on_eos=opts["stop_on_eos"]):
                out = [pb_utils.Tensor("token_id", np.asarray(tok.ids[:1], dtype=np.int64)),
                       pb_utils.Tensor("stop_reason", np.array([tok.stop or ""], dtype=np.object_))]
                sender.send(pb_utils.InferenceResponse(output_tensors=out), flags=final if tok.stop else 0)
                cancelled = getattr(request, "is_cancelled", None)
                if tok.stop is None and cancelled is not None and cancelled():
                    # the client went away: stop spending compute on it
                    pb_utils.Logger.log_info(f"smlp_generate: request cancelled by the client after "
                                             f"{tok.index + 1} token(s)")
                    sender.send(flags=final)
                    return
        except Exception as e:  # one error response, never a crashed model
            msg = (str(e).splitlines() or [type(e).__name__])[0]
            try:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {msg}")),
                            flags=final)
            except Exception as e2:  # the request is gone (e.g. cancelled): nobody left to tell
                pb_utils.Logger.log_warn(f"smlp_generate: {msg}; could not report it: {e2}")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                ids, opts = self.parse(request)
            except BadRequest as e:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self.pool.submit(self.stream, request, sender, ids, opts)
        return None  # decoupled: responses go through each request's sender

    def finalize(self):
        self.pool.shutdown(wait=True)  # let running streams finish their last response
