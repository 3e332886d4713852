"""Client of a served ``<name>_generate`` model: stream generated tokens over gRPC.

Uses ``tritonclient.grpc`` (the ``serve`` extra): a bidirectional stream (``start_stream`` /
``async_stream_infer``) with binary tensors, as Triton requires for decoupled models. One call opens
its own connection and stream, so any number of calls may run at once from different threads.
The protocol (inputs, outputs, stop reasons) is in docs/serving-generate.md.
"""
from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import SMLPError

DEFAULT_MODEL = "smlp_generate"


@dataclass(frozen=True)
class ServedLimits:
    """What a served generate model declares in its config (parameters)."""

    vocab_size: int
    eos_token_id: int | None
    max_seq_len: int


def check_server_address(server: str) -> str:
    """``server`` if it is HOST:PORT (or [IPv6]:PORT) with a port in 1..65535, else one SMLPError.
    gRPC itself takes a port modulo 65536 (99999 dials 34463) and logs pages for an empty address."""
    host, sep, port = str(server).rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    ok_host = bool(host) and not any(c.isspace() or not c.isprintable() or c in "/@?#" for c in host)
    if not sep or not ok_host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SMLPError(f"--server must be HOST:PORT with a port in 1..65535, got {server!r}")
    return server


def _client(server: str):
    check_server_address(server)
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        raise SMLPError("streaming from a server needs tritonclient[grpc]: install the 'serve' extra") from None
    return grpcclient, grpcclient.InferenceServerClient(server)


def _message(e: Exception) -> str:
    msg = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
    return (str(msg).strip().splitlines() or [type(e).__name__])[0]


def served_limits(server: str, model: str = DEFAULT_MODEL, *, timeout_s: float = 10.0) -> ServedLimits:
    """The vocabulary, EOS and max_seq_len of ``model`` on ``server`` (HOST:PORT, gRPC)."""
    from tritonclient.utils import InferenceServerException

    _, client = _client(server)
    try:
        if not client.is_model_ready(model, client_timeout=timeout_s):
            raise SMLPError(f"{server}: model {model!r} is not ready (is it in the repository?)")
        params = client.get_model_config(model, as_json=True, client_timeout=timeout_s)["config"].get("parameters", {})
    except InferenceServerException as e:
        raise SMLPError(f"{server}: {_message(e)}") from None
    finally:
        client.close()
    try:
        val = {k: v["string_value"] for k, v in params.items()}
        return ServedLimits(int(val["vocab_size"]), int(val["eos_token_id"]) if val["eos_token_id"] else None,
                            int(val["max_seq_len"]))
    except (KeyError, ValueError):
        raise SMLPError(f"{server}: model {model!r} is not an smlp generate model (no vocab_size / "
                        "eos_token_id / max_seq_len parameters)") from None


def stream_tokens(server: str, prompt: Sequence[int] | np.ndarray, *, model: str = DEFAULT_MODEL,
                  max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                  seed: int | None = None, stop_on_eos: bool | None = None,
                  timeout_s: float = 120.0) -> Iterator[tuple[int, str | None]]:
    """Yield ``(token_id, stop_reason)`` as the server produces them; stop_reason is None except on
    the last token ("eos", "max_new_tokens" or "max_seq_len"). Options left None take the server's
    defaults (64 tokens, greedy, seed 0, stop on EOS). An error response (bad prompt or option)
    raises ``SMLPError`` with the server's one-line message; so does no response for ``timeout_s``.
    Closing the iterator early cancels the request on the server."""
    from tritonclient.utils import InferenceServerException

    grpcclient, client = _client(server)
    ids = np.asarray(prompt, dtype=np.int64).reshape(-1)
    inputs = [grpcclient.InferInput("input_ids", [ids.size], "INT64")]
    inputs[0].set_data_from_numpy(ids)
    for name, value, dtype, kind in [("max_new_tokens", max_new_tokens, np.int64, "INT64"),
                                     ("temperature", temperature, np.float64, "FP64"),
                                     ("top_k", top_k, np.int64, "INT64"), ("seed", seed, np.int64, "INT64"),
                                     ("stop_on_eos", stop_on_eos, np.bool_, "BOOL")]:
        if value is not None:
            t = grpcclient.InferInput(name, [1], kind)
            t.set_data_from_numpy(np.array([value], dtype=dtype))
            inputs.append(t)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    finished = False
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        while True:
            try:
                result, error = answers.get(timeout=timeout_s)
            except queue.Empty:
                raise SMLPError(f"{server}: no response from {model} for {timeout_s:.0f} s") from None
            if error is not None:
                finished = True  # an error response ends the request
                raise SMLPError(f"{model}: {_message(error)}")
            params = result.get_response().parameters
            final = "triton_final_response" in params and params["triton_final_response"].bool_param
            token = result.as_numpy("token_id")
            if token is not None:
                reason = result.as_numpy("stop_reason").reshape(-1)[0]
                reason = reason.decode() if isinstance(reason, bytes) else str(reason)
                if final:
                    finished = True
                yield int(token.reshape(-1)[0]), (reason or None)
            if final:
                finished = True
                return
    except InferenceServerException as e:
        raise SMLPError(f"{server}: {_message(e)}") from None
    finally:
        try:
            client.stop_stream(cancel_requests=not finished)
        finally:
            client.close()


def generate(server: str, prompt: Sequence[int] | np.ndarray, **options) -> tuple[list[int], str]:
    """All tokens of one served generation and its stop reason (``stream_tokens`` collected)."""
    tokens, reason = [], ""
    for token, stop in stream_tokens(server, prompt, **options):
        tokens.append(token)
        reason = stop or reason
    if not reason:
        raise SMLPError(f"{server}: the stream ended without a stop reason")
    return tokens, reason
