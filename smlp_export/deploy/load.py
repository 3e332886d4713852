"""Requests against a served full-sequence model: exactness checks, bad input, and a load sweep.

Every response is compared with the same ONNX file run in-process on the same request alone. The
served model may run it inside a larger batch (Triton's dynamic batcher) and right-padded to a
longer length (python backend), which changes only the shapes the kernels see, so the summation
order of a few products: the bound is ``SERVING_ULPS`` units in the last place of the graph's compute
dtype, relative to the scale of the local logits. Measured on the default export (fp32): 0 for most
shapes, 1.6 ulps for T=1 (ONNX Runtime's matrix-vector path). A wrong pad side, a wrong row or a
response cut at the wrong length is off by O(scale), far above the bound.

Clients are tritonclient's gRPC clients (binary tensors, thread-safe), one per client thread.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ..artifacts import MODEL_FILE, Manifest
from ..errors import SMLPError

SERVING_ULPS = 16.0
_EPS = {"fp32": float(np.finfo(np.float32).eps), "fp16": float(np.finfo(np.float16).eps), "bf16": 2.0 ** -7}


def serving_bound(dtype: str) -> float:
    """Largest accepted max |served - local| / scale(local) for a graph computing in ``dtype``."""
    if dtype not in _EPS:
        raise SMLPError(f"no serving bound for dtype {dtype!r}; known: {', '.join(_EPS)}")
    return SERVING_ULPS * _EPS[dtype]


def relative_error(local: np.ndarray, served: np.ndarray) -> float:
    """max |served - local| / max |local|; inf when the shapes differ or the response is not finite."""
    if served.shape != local.shape or not np.isfinite(served).all():
        return float("inf")
    scale = float(np.abs(local).max()) or 1.0
    return float(np.abs(served.astype(np.float64) - local.astype(np.float64)).max()) / scale


@dataclass
class Request:
    """One held-out request and the logits the export gives it in-process, alone."""

    ids: np.ndarray  # [b, T] int64
    local: np.ndarray  # [b, T, V] float32


def request_pool(export_dir, lengths: Sequence[int], *, per_length: int = 2, batch: int = 1,
                 offset: int = 0) -> list[Request]:
    """Held-out windows of the given lengths (clipped to max_seq_len), each run in-process alone."""
    from pathlib import Path

    from smlp_export.runners.ort_session import create_session

    from ..data import heldout_windows

    export_dir = Path(export_dir)
    cfg = Manifest.read(export_dir).config
    n, vocab = int(cfg["max_seq_len"]), int(cfg["vocab_size"])
    sess = create_session(export_dir / MODEL_FILE)
    pool = []
    for i, t in enumerate(lengths):
        t = max(1, min(int(t), n))
        for j in range(per_length):
            ids = heldout_windows(batch, t, offset=offset + 7 * (i * per_length + j), vocab_size=vocab).numpy()
            pool.append(Request(ids, sess.run(["logits"], {"input_ids": ids})[0]))
    return pool


class Client:
    """A tritonclient gRPC client for one model's ``input_ids -> logits``."""

    def __init__(self, grpc_url: str, model: str) -> None:
        try:
            import tritonclient.grpc as grpcclient
        except ImportError:
            raise SMLPError("tritonclient is missing: install the 'serve' extra") from None
        self._g = grpcclient
        self.model = model
        self.client = grpcclient.InferenceServerClient(grpc_url)

    def logits(self, ids: np.ndarray, timeout_s: float = 120.0) -> np.ndarray:
        """Raises tritonclient's InferenceServerException on an error response."""
        x = self._g.InferInput("input_ids", list(ids.shape), "INT64")
        x.set_data_from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        res = self.client.infer(self.model, [x], outputs=[self._g.InferRequestedOutput("logits")],
                                client_timeout=timeout_s)
        return res.as_numpy("logits")

    def counts(self) -> tuple[int, int]:
        """(inference_count, execution_count) of the model so far: their ratio is the mean batch."""
        st = self.client.get_inference_statistics(self.model).model_stats[0]
        return int(st.inference_count), int(st.execution_count)

    def close(self) -> None:
        self.client.close()


def _message(e: BaseException) -> str:
    msg = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
    return (msg or type(e).__name__).splitlines()[0]


def check_bad_inputs(grpc_url: str, model: str, max_seq_len: int, vocab_size: int,
                     good: Request, bound: float) -> list[dict[str, Any]]:
    """Send each kind of bad request, then a good one: every bad one must get an error response
    naming the problem and the good one must still be served correctly."""
    cases = [("longer than max_seq_len", np.zeros((1, max_seq_len + 1), np.int64), "max_seq_len"),
             ("empty prompt", np.zeros((1, 0), np.int64), "empty"),
             ("token id outside the vocabulary", np.full((1, 4), vocab_size, np.int64), "vocabulary"),
             ("negative token id", np.full((1, 4), -1, np.int64), "vocabulary")]
    c = Client(grpc_url, model)
    rows = []
    try:
        for what, ids, expect in cases:
            try:
                c.logits(ids)
                rows.append({"case": what, "passed": False, "error": None})
            except Exception as e:  # tritonclient raises InferenceServerException for error responses
                msg = _message(e)
                rows.append({"case": what, "passed": expect in msg, "error": msg})
        err = relative_error(good.local, c.logits(good.ids))
        rows.append({"case": "good request after the bad ones", "passed": err <= bound, "max_err_rel": err})
    finally:
        c.close()
    return rows


@dataclass
class LoadRow:
    concurrency: int
    requests: int
    errors: int
    mismatches: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput_per_s: float
    seconds: float
    max_err_rel: float
    mean_batch: float  # requests per model execution on the server (Triton statistics)
    first_error: str | None = None
    first_mismatch: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d


def run_load(grpc_url: str, model: str, pool: list[Request], concurrency: int, *, bound: float,
             duration_s: float | None = 5.0, requests: int | None = None) -> LoadRow:
    """``concurrency`` client threads send pool requests back to back (client ``i`` starts at pool
    item ``i``) until ``duration_s`` has passed or ``requests`` have been sent in all."""
    if concurrency < 1:
        raise SMLPError(f"concurrency must be >= 1, got {concurrency}")
    if (duration_s is None) == (requests is None):
        raise SMLPError("give exactly one of a duration or a request count")
    lock = threading.Lock()
    lat: list[float] = []
    state = {"sent": 0, "errors": 0, "mismatches": 0, "worst": 0.0, "first_error": None, "first_mismatch": None}
    clients = [Client(grpc_url, model) for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def take() -> bool:
        with lock:
            if requests is not None:
                if state["sent"] >= requests:
                    return False
            elif time.perf_counter() >= deadline[0]:
                return False
            state["sent"] += 1
            return True

    def worker(i: int) -> None:
        c, k = clients[i], i
        start.wait()
        while take():
            r = pool[k % len(pool)]
            k += 1
            t0 = time.perf_counter()
            try:
                got = c.logits(r.ids)
            except Exception as e:
                with lock:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or _message(e)
                continue
            dt = time.perf_counter() - t0
            err = relative_error(r.local, got)
            with lock:
                lat.append(dt)
                state["worst"] = max(state["worst"], err)
                if not err <= bound:
                    state["mismatches"] += 1
                    state["first_mismatch"] = state["first_mismatch"] or (
                        f"request {list(r.ids.shape)}: max |served - local| / scale = {err:.3g} > {bound:.3g}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    inf0, exe0 = clients[0].counts()
    deadline[0] = time.perf_counter() + (duration_s or 0.0)
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    inf1, exe1 = clients[0].counts()
    for c in clients:
        c.close()
    ms = np.array(lat) * 1e3 if lat else np.array([float("nan")])
    return LoadRow(concurrency=concurrency, requests=state["sent"], errors=state["errors"],
                   mismatches=state["mismatches"], p50_ms=float(np.percentile(ms, 50)),
                   p90_ms=float(np.percentile(ms, 90)), p99_ms=float(np.percentile(ms, 99)),
                   throughput_per_s=len(lat) / elapsed, seconds=elapsed, max_err_rel=state["worst"],
                   mean_batch=(inf1 - inf0) / (exe1 - exe0) if exe1 > exe0 else float("nan"),
                   first_error=state["first_error"], first_mismatch=state["first_mismatch"])


def parse_concurrency(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; one clear error otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SMLPError(f"--concurrency must be comma-separated integers like 1,4,16, got {text!r}") from None
    if not values or any(v < 1 or v > 256 for v in values):
        raise SMLPError(f"--concurrency values must be in [1, 256], got {text!r}")
    return values


def parse_concurrency_range(text: str) -> list[int]:
    """perf_analyzer's ``START:END[:STEP]`` (linear, END included when reached): '1:16:4' ->
    [1, 5, 9, 13]; same bounds as ``parse_concurrency``."""
    parts = text.split(":")
    try:
        nums = [int(x) for x in parts]
    except ValueError:
        nums = []
    if len(nums) not in (2, 3) or (len(nums) == 3 and nums[2] < 1) or nums[0] > nums[1]:
        raise SMLPError(f"--concurrency-range must be START:END[:STEP] with START <= END and STEP >= 1, "
                        f"like 1:16:4, got {text!r}")
    start, end, step = nums[0], nums[1], nums[2] if len(nums) == 3 else 1
    values = list(range(start, end + 1, step))
    if start < 1 or end > 256:
        raise SMLPError(f"--concurrency-range values must be in [1, 256], got {text!r}")
    return values


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The load rows as an aligned text table (CLI output) ."""
    head = ["concurrency", "requests", "errors", "mismatches", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s",
            "mean_batch"]
    body = [[str(r["concurrency"]), str(r["requests"]), str(r["errors"]), str(r["mismatches"]),
             f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['throughput_per_s']:.1f}",
             f"{r['mean_batch']:.2f}"] for r in rows]
    w = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    return ["  ".join(h.rjust(w[i]) for i, h in enumerate(head))] + \
           ["  ".join(c.rjust(w[i]) for i, c in enumerate(b)) for b in body]
