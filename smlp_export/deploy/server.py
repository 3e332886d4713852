"""Start a real Triton Inference Server on loopback to check a model repository end to end.

Uses the ``tritonserver`` binary bundled with PyPI's ``nvidia-pytriton`` (the ``serve`` extra), which
has the python backend only: repositories written with ``--backend python`` can be checked here; the
onnxruntime-backend ones need a full Triton build (NGC container). The server binds to 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import SMLPError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_pytriton() -> Path:
    try:
        import pytriton
    except ImportError:
        raise SMLPError("no tritonserver here: install the 'serve' extra (nvidia-pytriton)") from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise SMLPError(f"nvidia-pytriton at {root} has no bundled tritonserver binary")
    return root


@dataclass(frozen=True)
class ServerAddress:
    """Where a local tritonserver listens (all on 127.0.0.1)."""

    http_url: str  # "http://127.0.0.1:PORT" (KServe v2 HTTP)
    grpc_url: str  # "127.0.0.1:PORT" (tritonclient.grpc: needed for decoupled/streaming models)
    log_path: Path  # the server's combined stdout/stderr, alive while the context is open


@contextlib.contextmanager
def local_tritonserver(repo: str | Path, *, timeout_s: float = 120.0) -> Iterator[ServerAddress]:
    """Run ``tritonserver`` on ``repo``; yields its addresses; stops the server on exit."""
    root = find_pytriton()
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    if not stub.is_file():
        raise SMLPError(f"nvidia-pytriton has no python backend stub for Python {sys.version_info.major}.{sys.version_info.minor}")
    with tempfile.TemporaryDirectory(prefix="smlp-triton-") as tmp:
        backends = Path(tmp) / "backends"
        shutil.copytree(root / "backends", backends)
        shutil.copy2(stub, backends / "python" / stub.name)
        env = dict(os.environ)
        # The stub links against the interpreter's libpython and pytriton's bundled CUDA runtime.
        libs = [sysconfig.get_config_var("LIBDIR"), str(root.parent.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join([sysconfig.get_paths()["purelib"], env.get("PYTHONPATH", "")])
        # The stub's embedded Python finds its prefix (and so its site-packages) from the first
        # `python3` on PATH, not from PYTHONPATH: put this interpreter's (the virtualenv's) first,
        # so the served model imports this environment's onnxruntime even when the virtualenv was
        # never activated (smlp run as .venv/bin/smlp).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        http, grpc, metrics = _free_port(), _free_port(), _free_port()
        log = open(Path(tmp) / "server.log", "w+")
        proc = subprocess.Popen(
            [str(root / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory", str(backends),
             "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--metrics-address", "127.0.0.1",
             f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{http}"
        try:
            deadline = time.time() + timeout_s
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    tail = [ln for ln in log.read().splitlines() if "error" in ln.lower()][-1:]
                    raise SMLPError(f"tritonserver exited with code {proc.returncode}: {tail[0] if tail else 'see its log'}")
                try:
                    with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.time() > deadline:
                    raise SMLPError(f"tritonserver not ready after {timeout_s:.0f} s")
                time.sleep(0.5)
            yield ServerAddress(url, f"127.0.0.1:{grpc}", Path(tmp) / "server.log")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def infer(url: str, model: str, input_ids: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
    """One KServe-v2 HTTP inference request: int64 ``input_ids`` [B, T] -> named outputs."""
    body = {"inputs": [{"name": "input_ids", "shape": list(input_ids.shape), "datatype": "INT64",
                        "data": input_ids.reshape(-1).tolist()}],
            "outputs": [{"name": n} for n in outputs]}
    req = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            res = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SMLPError(f"{model}: server answered {e.code}: {e.read().decode(errors='replace')[:200]}") from None
    return {o["name"]: np.asarray(o["data"], dtype=np.float32).reshape(o["shape"]) for o in res["outputs"]}


def check_repository(repo: str | Path, export_dir: str | Path, model: str = "smlp",
                     cases: tuple[tuple[int, int], ...] = ((1, 1), (3, 77), (2, 128))) -> dict:
    """Serve ``repo`` and compare the server's logits with the same ONNX file run in-process on
    held-out text. Returns ``{"passed", "max_abs_err", "cases"}`` (the same ORT runs on both sides,
    so any difference means the serving path changed the numbers)."""
    import onnxruntime as ort

    from ..data import heldout_windows

    manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
    max_len = int(manifest["config"]["max_seq_len"])
    sess = ort.InferenceSession(str(Path(export_dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    rows, worst = [], 0.0
    with local_tritonserver(repo) as srv:
        url = srv.http_url
        for i, (b, t) in enumerate(cases):
            t = min(t, max_len)
            ids = heldout_windows(b, t, offset=i * 7, vocab_size=int(manifest["config"]["vocab_size"])).numpy()
            served = infer(url, model, ids, ["logits"])["logits"]
            local = sess.run(["logits"], {"input_ids": ids})[0]
            err = float(np.abs(served - local).max())
            worst = max(worst, err)
            rows.append({"batch": b, "seq": t, "max_abs_err": err})
    return {"passed": worst == 0.0, "max_abs_err": worst, "cases": rows}
