"""The ``ort`` target on ONNX Runtime's CUDA provider in fp16: parity with PyTorch, latency vs torch eager.

    python benchmarks/ort_cuda.py --out benchmarks/results/ort_cuda        # a CUDA machine with onnxruntime-gpu
    python benchmarks/ort_cuda.py --dry-run --out /tmp/oc                   # CPU provider, tiny cases: checks the script

1. export the default checkpoint with ``--target ort --dtype fp16`` (the project's exporter);
2. parity: the project's validator (``smlp_export.validate.run_validation``, real held-out text, the fp16
   tolerance table) with the session on CUDAExecutionProvider (ORT's silent CPU fallback is refused);
3. latency, side by side in one run: the ORT session vs the same checkpoint in torch eager on the GPU
   (fp32 and fp16; the custom ops dispatch to the Triton kernels there). ORT is timed through
   ``run`` on host arrays (its host<->device copies included), torch with device tensors and
   ``torch.cuda.synchronize``: each as an application would call it.
If the CUDA provider is not in this onnxruntime build or no GPU is visible, it prints one
``skip:`` line, writes the reason into the JSON and exits 0 (nothing measured).
Writes ``<out>/ort_cuda.json`` (temp name + rename).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROVIDER = "CUDAExecutionProvider"
SHAPES_FULL = [(1, 128), (8, 128), (8, 512)]
SHAPES_DRY = [(1, 16), (2, 32)]


def _write(out: Path, report: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "ort_cuda.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out / "ort_cuda.json")
    return out / "ort_cuda.json"


def _median_ms(fn, reps: int, sync=None) -> float:
    fn()  # warm-up (session / kernel compilation)
    if sync:
        sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ort_cuda"), help="output folder")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU provider and torch on CPU, tiny cases (checks the script; measures nothing useful)")
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the embedded default model)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per case (default 30; dry run 2)")
    args = ap.parse_args(argv)

    import torch

    from smlp_export import data, load_checkpoint
    from smlp_export.runners.ort_session import check_provider
    from smlp_export.export.pipeline import export_model
    from smlp_export.runners import RunnerUnavailable, get_runner
    from smlp_export.validate.parity import run_validation

    provider = "CPUExecutionProvider" if args.dry_run else PROVIDER
    report: dict = {"dry_run": args.dry_run, "provider": provider, "target": "ort", "dtype": "fp16",
                    "command": " ".join(sys.argv), "torch": torch.__version__}
    try:
        import onnxruntime as ort

        report["onnxruntime"] = ort.__version__
        check_provider(provider)
    except (ImportError, RunnerUnavailable) as e:
        report["skipped"] = f"ONNX Runtime {PROVIDER} unavailable: {e}"
        print(f"skip: {report['skipped']}", flush=True)
        print(f"wrote {_write(args.out, report)}")
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    report["gpu"] = torch.cuda.get_device_name() if device.type == "cuda" else "none (dry run)"
    reps = args.reps or (2 if args.dry_run else 30)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="smlp-ort-cuda-") as tmp:
        exp = export_model(args.checkpoint, Path(tmp) / "export", target="ort", dtype="fp16", validate=False,
                           force=True)
        export_dir = Path(exp.out_dir)
        print(f"exported --target ort --dtype fp16 in {time.time() - t0:.0f} s", flush=True)
        par = run_validation(export_dir, "ort", checkpoint=args.checkpoint, quick=args.dry_run,
                             providers=[provider], write=False)
        report["parity"] = {"passed": par.passed, "failures": par.failures, "metrics": par.metrics,
                            "tolerances": par.tolerances, "providers": par.backend_metadata.get("providers")}
        print(f"parity ort/{provider} fp16 vs torch: {'PASSED' if par.passed else 'FAILED'} "
              f"(max |logit err| / scale {par.metrics.get('max_abs_err_rel', float('nan')):.3g})", flush=True)

        runner = get_runner("ort", export_dir, providers=[provider])
        runner.load()
        model = load_checkpoint(args.checkpoint).eval()
        source = data.corpus_source_of(model)
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        rows = []
        try:
            for b, t in (SHAPES_DRY if args.dry_run else SHAPES_FULL):
                t = min(t, model.config.max_seq_len)
                ids = data.heldout_windows(b, t, source).numpy().astype(np.int64)
                ids_t = torch.from_numpy(ids).to(device)
                row = {"batch": b, "seq": t}
                row["ms_ort_fp16"] = _median_ms(lambda: runner.run(ids), reps)
                with torch.no_grad():
                    for name, dt in (("fp32", torch.float32), ("fp16", torch.float16)):
                        m = model.to(device=device, dtype=dt)
                        row[f"ms_torch_eager_{name}"] = _median_ms(lambda: m(ids_t), reps, sync)
                    model.to(dtype=torch.float32)
                row["speedup_ort_vs_torch_fp16"] = row["ms_torch_eager_fp16"] / row["ms_ort_fp16"]
                row["speedup_ort_vs_torch_fp32"] = row["ms_torch_eager_fp32"] / row["ms_ort_fp16"]
                rows.append(row)
                print(f"B={b} T={t}: ort fp16 {row['ms_ort_fp16']:.2f} ms, torch eager fp16 "
                      f"{row['ms_torch_eager_fp16']:.2f} ms / fp32 {row['ms_torch_eager_fp32']:.2f} ms "
                      f"({row['speedup_ort_vs_torch_fp16']:.2f}x vs fp16 eager)", flush=True)
        finally:
            runner.close()
    report["latency"] = rows
    report["seconds"] = time.time() - t0
    path = _write(args.out, report)
    if args.dry_run:
        print("dry run: CPU provider, not a measurement")
    print(f"wrote {path} in {report['seconds']:.0f} s")
    return 0 if par.passed or args.dry_run else 2


if __name__ == "__main__":
    sys.exit(main())
