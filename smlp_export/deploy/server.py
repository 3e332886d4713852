"""Start a real Triton Inference Server on loopback to check a model repository end to end.

Uses the ``tritonserver`` binary bundled with PyPI's ``nvidia-pytriton`` (the ``serve`` extra), which
has the python backend only: repositories written with ``--backend python`` can be checked here; the
onnxruntime-backend ones need a full Triton build (NGC container). The server binds to 127.0.0.1.
"""
from __future__ import annotations

import contextlib
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


from ..artifacts import DEPLOY_RECORD_FILE, MODEL_FILE, Manifest, read_json
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
        # The python backend's stub imports each model.py from the repository and writes __pycache__
        # next to it (its embedded Python ignores PYTHONDONTWRITEBYTECODE): removed again on exit, so a
        # checked repository ships as it was written.
        caches_before = set(Path(repo).rglob("__pycache__"))
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
                proc.wait()
            log.close()
            for cache in set(Path(repo).rglob("__pycache__")) - caches_before:
                shutil.rmtree(cache, ignore_errors=True)


def check_repository(repo: str | Path, export_dir: str | Path, model: str = "smlp",
                     cases: tuple[tuple[int, int], ...] = ((1, 1), (3, 77), (2, 128)), *,
                     concurrency: list[int] | None = None, duration_s: float | None = 5.0,
                     requests: int | None = None, progress=None) -> dict:
    """Serve ``repo`` locally and check it against the export run in-process on held-out text.

    1. ``cases`` (batch, tokens) one at a time; 2. bad requests (too long, empty, ids outside the
    vocabulary), each must get its own error response, and a good request after them must still be
    served; 3. with ``concurrency``, a load sweep (smlp_export.deploy.load.run_load) from held-out
    requests of mixed lengths. Every response must be within ``serving_bound`` of the in-process run.
    When the repository has ``<model>_generate`` (python backend, export with decode.onnx), its
    streams are compared token for token with local generation (``check_generate_model``).
    Returns ``{"passed", "max_err_rel", "bound", "cases", "bad_input", "generate", "load"}``.
    """
    from smlp_export.runners.ort_session import create_session

    from ..data import heldout_windows
    from .load import Client, check_bad_inputs, relative_error, request_pool, run_load, serving_bound

    repo, export_dir = Path(repo), Path(export_dir)
    manifest = Manifest.read(export_dir)
    cfg = manifest.config
    max_len, vocab = int(cfg["max_seq_len"]), int(cfg["vocab_size"])
    deployed = read_json(repo / DEPLOY_RECORD_FILE, what="deployment record")
    mb = next((int(m.get("max_batch_size", 0)) for m in deployed["models"] if m["name"] == model), 0)
    bound = serving_bound(manifest.dtype)
    sess = create_session(export_dir / MODEL_FILE)
    say = progress or (lambda msg: None)
    rows, worst = [], 0.0
    with local_tritonserver(repo) as srv:
        client = Client(srv.grpc_url, model)
        try:
            for i, (b, t) in enumerate(cases):
                b, t = min(b, mb) if mb else b, min(t, max_len)
                ids = heldout_windows(b, t, offset=i * 7, vocab_size=vocab).numpy()
                err = relative_error(sess.run(["logits"], {"input_ids": ids})[0], client.logits(ids))
                worst = max(worst, err)
                rows.append({"batch": b, "seq": t, "max_err_rel": err, "passed": err <= bound})
                say(f"served B={b} T={t}: max |served - local| / scale = {err:.3g} (bound {bound:.3g})")
        finally:
            client.close()
        pool = request_pool(export_dir, [max_len, max_len // 2, max_len // 4, 16, 5, 1], per_length=2,
                            offset=1000)
        bad = check_bad_inputs(srv.grpc_url, model, max_len, vocab, pool[0], bound)
        for r in bad:
            say(f"bad input: {r['case']}: {'ok' if r['passed'] else 'FAILED'}"
                + (f" ({r['error']})" if r.get("error") else ""))
        generate = None
        if (repo / f"{model}_generate").is_dir():  # token streaming: same tokens as local generation
            from .generate_model import check_generate_model

            generate = check_generate_model(srv.grpc_url, export_dir, f"{model}_generate")
            n_eq = sum(c["equal"] for c in generate["cases"])
            say(f"{model}_generate: {n_eq}/{len(generate['cases'])} streams equal local generation "
                "(greedy and sampled)")
        load = []
        if concurrency:
            run_load(srv.grpc_url, model, pool, 1, bound=bound, duration_s=None, requests=len(pool))  # warm-up, not reported
            for c in concurrency:
                row = run_load(srv.grpc_url, model, pool, c, bound=bound, duration_s=duration_s,
                               requests=requests if duration_s is None else None).to_dict()
                load.append(row)
                say(f"concurrency {c}: {row['requests']} requests, {row['errors']} errors, "
                    f"{row['mismatches']} mismatches, p50 {row['p50_ms']:.1f} ms, "
                    f"{row['throughput_per_s']:.1f} req/s, mean batch {row['mean_batch']:.2f}")
    passed = (all(r["passed"] for r in rows) and all(r["passed"] for r in bad)
              and all(r["errors"] == 0 and r["mismatches"] == 0 for r in load)
              and (generate is None or generate["passed"]))
    worst = max([worst] + [r["max_err_rel"] for r in load])
    return {"passed": passed, "max_err_rel": worst, "bound": bound, "cases": rows, "bad_input": bad,
            "generate": generate, "load": load}
