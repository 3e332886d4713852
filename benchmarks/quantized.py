"""Weight-only quantized exports side by side: model bytes, prefill latency, decode tokens/s.

For one shape (default: the ``small`` preset, d=768, n=1024, 12 blocks, 16 token experts; random
init, float32) this exports the ``ort`` target as fp32, fp16, int8 and int4
(``--quantize``, block 32; model.onnx + decode.onnx, no validation (the tests and
docs/validation.md cover that); each export in a subprocess, skipped when the work folder already
holds it), then, one variant at a time in this process at ``--threads`` (default 1):

- model bytes (model.onnx + data, decode.onnx + data);
- prefill p50 at B=1, T=``--seq`` (model.onnx, held-out-like token ids);
- decode tokens/s at B=1 and B=8 (decode.onnx, IO-bound states, ``--steps`` single-token steps after
  a 64-token prefill; median step time);
- the bytes a B=1 decode step must read: every weight of decode.onnx except that only k/E of the
  token experts, one row of each spatial weight and one embedding row are used per token;
- this machine's memory bandwidth (NumPy, one thread: a dot of 512 MiB with itself, and a 512 MiB copy),
  so ``bandwidth / bytes per token`` bounds the decode rate each variant could reach.

Goal (issue 19), reported, never asserted: int4 decode tokens/s at B=1 >= 2.5 x fp32.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common  # noqa: E402
from smlp_export.artifacts import DATA_SUFFIX, DECODE_FILE, MANIFEST_FILE, MODEL_FILE  # noqa: E402

VARIANTS = ("fp32", "fp16", "int8", "int4")


def _smlp() -> list[str]:
    return [sys.executable, "-m", "smlp_cli.main"]


def bandwidth(mib: int = 512, reps: int = 5) -> dict:
    """Single-thread read (dot of an array with itself) and copy (read + write counted) bandwidth in
    GB/s, best of ``reps``."""
    a = np.ones(mib * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    rd, cp = [], []
    for _ in range(reps):
        t = time.perf_counter()
        np.dot(a, a)  # BLAS sdot of an array with itself: one streaming read of a.nbytes
        rd.append(a.nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        np.copyto(b, a)
        cp.append(2 * a.nbytes / (time.perf_counter() - t) / 1e9)
    del a, b
    return {"read_gb_s": max(rd), "copy_gb_s": max(cp), "mib": mib}


def _files_bytes(out: Path, names: list[str]) -> int:
    return sum((out / n).stat().st_size for n in names if (out / n).exists())


def bytes_per_token(decode_onnx: Path, cfg: dict) -> int:
    """Weight bytes one B=1 decode step reads (see the module docstring)."""
    import onnx

    m = onnx.load(str(decode_onnx), load_external_data=False)
    k = cfg["top_k"] if cfg["token_routing"] == "topk" else 1
    total = 0.0
    for t in m.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        nbytes = n * {1: 4, 10: 2, 2: 1, 3: 1, 22: 0.5, 16: 2}.get(t.data_type, 4)
        if ".tmoe.w" in t.name or ".tmoe.b" in t.name:
            nbytes *= k / cfg["n_token_experts"]
        elif "spatial.weight" in t.name or "smoe.weight" in t.name:
            nbytes /= cfg["max_seq_len"]
        elif "embed" in t.name:
            nbytes /= cfg["vocab_size"]
        total += nbytes
    return int(total)


def export_one(ckpt: Path, out: Path, variant: str) -> None:
    """model.onnx + decode.onnx of one variant (no decode_seq.onnx, no validation: timing only)."""
    import shutil

    from smlp_export.decode.export import export_decode_graph
    from smlp_export.export.pipeline import export_model
    from smlp_export.export.weights import open_checkpoint
    from smlp_export.quantize import QuantScheme

    q = {"int8": "int8", "int4": "int4"}.get(variant)
    dtype = "fp16" if variant == "fp16" else "fp32"
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    res = export_model(str(ckpt), tmp, target="ort", dtype=dtype, quantize=q, validate=False, force=True)
    model = open_checkpoint(str(ckpt), dtype=dtype)
    man = res.manifest
    man["decode"] = export_decode_graph(model, tmp / DECODE_FILE, target="ort", dtype=dtype,
                                        quantize=QuantScheme.make(q) if q else None)
    man["files"] += [{"name": n, "bytes": (tmp / n).stat().st_size} for n in (DECODE_FILE, DECODE_FILE + DATA_SUFFIX)
                     if (tmp / n).exists()]
    (tmp / MANIFEST_FILE).write_text(json.dumps(man, indent=2))
    tmp.rename(out)


def export(ckpt: Path, out: Path, variant: str) -> dict:
    if (out / MANIFEST_FILE).exists():
        return {"status": "ok", "reused": True}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--export-one", variant, str(ckpt), str(out)],
                       capture_output=True, text=True)
    if r.returncode:
        return {"status": "failed", "reason": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return {"status": "ok", "seconds": round(time.perf_counter() - t, 1)}


def time_prefill(out: Path, ids: np.ndarray, threads: int, reps: int) -> float:
    from smlp_export.runners.ort_runner import OrtRunner

    r = OrtRunner(out / MODEL_FILE, intra_op_threads=threads)
    r.load()
    try:
        r.run(ids)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            r.run(ids)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3
    finally:
        r.close()


def time_decode(out: Path, ids: np.ndarray, threads: int, batch: int, steps: int) -> float:
    """Tokens/s of single-token steps after a 64-token prefill (ids: at least 65 tokens)."""
    from smlp_export.decode.runtime import OrtDecoder

    dec = OrtDecoder(out, threads=threads)
    s = dec.new_stream(batch)
    prompt = np.repeat(ids[:1, :64], batch, 0)
    s.step(prompt, 0)
    one = np.repeat(ids[:1, 64:65], batch, 0)
    s.step(one, 64)  # warm-up
    ts = []
    for i in range(steps):
        t = time.perf_counter()
        s.step(one, 65 + i)
        ts.append(time.perf_counter() - t)
    del s, dec
    return batch / statistics.median(ts)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--export-one":  # child process: one export, then exit
        export_one(Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[2])
        return
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/smlp-quant-bench"))
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--reps", type=int, default=5, help="timed prefill runs per variant")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    threads = args.threads or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    _common.setup_threads(threads)
    from smlp_export.bench.machine import describe_machine
    from smlp_export.config import preset

    cfg = preset(args.preset)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"ckpt-{args.preset}"
    if not (ckpt / "config.json").exists():
        subprocess.run([*_smlp(), "init", "--preset", args.preset, "--seed", "0", "-o", str(ckpt), "--force"], check=True)
    bw = bandwidth()
    print(f"bandwidth: read {bw['read_gb_s']:.1f} GB/s, copy {bw['copy_gb_s']:.1f} GB/s (1 thread)", flush=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size - 1, (1, max(args.seq, 65))).astype(np.int64)
    rows = []
    for name in args.variants.split(","):
        out = work / f"{args.preset}-{name}"
        print(f"[{name}] export", flush=True)
        row = {"variant": name, **export(ckpt, out, name)}
        if row["status"] != "ok":
            print(f"[{name}] {row['reason']}")
            rows.append(row)
            continue
        man = json.loads((out / MANIFEST_FILE).read_text())
        files = [f["name"] for f in man["files"]]
        row["model_bytes"] = _files_bytes(out, [f for f in files if f.startswith(MODEL_FILE)])
        row["decode_bytes"] = _files_bytes(out, [f for f in files if f.startswith(DECODE_FILE)])
        row["bytes_per_token"] = bytes_per_token(out / DECODE_FILE, man["config"])
        row["bits_per_weight"] = (man.get("quantization") or {}).get("bits_per_weight")
        try:
            row["prefill_p50_ms"] = time_prefill(out, ids[:, :args.seq], threads, args.reps)
            for b in (1, 8):
                row[f"decode_tok_s_b{b}"] = time_decode(out, ids, threads, b, args.steps)
        except Exception as e:  # noqa: BLE001 - e.g. a dtype the CPU provider cannot run
            row.update(status="failed", reason=str(e).splitlines()[0][:200])
        row["bound_tok_s_b1"] = bw["read_gb_s"] * 1e9 / row["bytes_per_token"]
        gc.collect()
        print(f"[{name}] " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                                       if k not in ("variant",)), flush=True)
        rows.append(row)
    by = {r["variant"]: r for r in rows if r.get("status") == "ok"}
    goals = []
    if "fp32" in by and "int4" in by:
        goals.append(_common.goal_line("int4 decode tokens/s at B=1 / fp32", by["int4"]["decode_tok_s_b1"]
                                       / by["fp32"]["decode_tok_s_b1"], 2.5, ">="))
    payload = {"config": {"preset": args.preset, "model": cfg.to_dict(), "threads": threads, "seq": args.seq,
                          "steps": args.steps, "reps": args.reps}, "bandwidth": bw, "rows": rows, "goals": goals}
    _common.save("quantized", args, payload, describe_machine())


if __name__ == "__main__":
    main()
