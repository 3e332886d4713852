"""``smlp bench``: latency of a checkpoint or export across backends (table, JSON, PNG, ORT profile)."""
from __future__ import annotations

import click

from .options import FiniteFloat, elsewhere_option


def _int_list(text: str, what: str) -> list[int]:
    from smlp_export.errors import InputError

    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} expects comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise InputError(f"{what} expects integers >= 1, got {text!r}")
    return vals


@click.command("bench")
@click.argument("source", required=False, default=None, metavar="[CKPT|OUT|FILE.onnx]")
@click.option("--backends", default="torch,torch-compile,ort,ort-portable", show_default=True,
              help="Comma-separated: torch, torch-compile, ort, ort-portable, ort-cuda, ort-cuda-portable, tensorrt.")
@click.option("--batch", "batch", default="1,8", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--seq", "seq", default="64,128", show_default=True, help="Sequence lengths, comma-separated.")
@click.option("--dtype", "dtypes", default="fp32", show_default=True,
              help="Compute dtype(s) of the ONNX graphs, comma-separated: fp32, fp16 (torch backends run fp32).")
@click.option("--threads", type=int, default=None, help="Intra-op threads for every backend (default: usable cores).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed runs per case.")
@click.option("--min-runs", type=int, default=10, show_default=True, help="Timed runs per case, at least.")
@click.option("--min-time", type=FiniteFloat(0), default=1.0, show_default=True, help="Seconds of timed runs per case, at least.")
@click.option("--max-time", type=FiniteFloat(0, min_open=True), default=30.0, show_default=True, help="Stop a case after this many timed seconds.")
@click.option("--quick", is_flag=True, help="Smoke-test timing (1 warm-up, >= 5 runs, >= 0.2 s).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the JSON report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: latency vs sequence length per backend, one panel per batch size.")
@click.option("--profile", is_flag=True,
              help="After timing, profile each ONNX Runtime backend (ORT profiler) at the largest batch/seq and print per-op time.")
@click.option("--profile-runs", type=click.IntRange(1), default=10, show_default=True, help="Runs in each profile.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@elsewhere_option("--providers", "the ONNX Runtime provider is part of each backend's name: --backends ort (CPU), "
                                 "ort-cuda (CUDA), tensorrt (a TensorRT engine)")
@elsewhere_option("--concurrency-range", "bench times one request at a time; a load sweep runs against a served "
                                         "repository: smlp deploy OUT -o REPO --backend python --check "
                                         "--concurrency-range 1:16:4")
def bench(source, backends, batch, seq, dtypes, threads, warmup, min_runs, min_time, max_time, quick, json_path,
          plot_path, profile, profile_runs, no_progress):
    """Time a checkpoint (or an export folder / .onnx file) on each backend.

    Inputs are real held-out token ids. Each case: warm-up runs, then timed runs until both
    --min-runs and --min-time are reached; the table shows p50/p90/p99, mean, tokens/s (at p50)
    and the spread (p90-p10)/p50. Backends that cannot run here are listed as skipped with the reason
    (--backends tensorrt alone without TensorRT: one error line, exit 1).
    """
    import sys
    import tempfile
    from pathlib import Path

    from smlp_export.bench.backends import Source, parse_backends
    from smlp_export.bench.machine import describe_machine, short_description
    from smlp_export.bench.report import format_table, make_report, write_json, write_plot
    from smlp_export.bench.sweep import run_sweep
    from smlp_export.bench.timing import TimingConfig
    from smlp_export.errors import InputError

    specs = parse_backends(backends)
    if all(s.runtime == "tensorrt" for s in specs):
        # TensorRT alone: a missing TensorRT is an error (in a list it is a skipped row with the reason)
        from smlp_export.errors import SMLPError
        from smlp_export.runners import RunnerUnavailable
        from smlp_export.runners.registry import get_runner_class

        try:
            get_runner_class("tensorrt").check_available()
        except RunnerUnavailable as e:
            raise SMLPError(f"--backends tensorrt: {e}") from None
    batches, seqs = _int_list(batch, "--batch"), _int_list(seq, "--seq")
    dtype_list = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    bad = [d for d in dtype_list if d not in ("fp32", "fp16")]
    if bad or not dtype_list:
        raise InputError(f"--dtype expects fp32 and/or fp16, got {dtypes!r}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    try:
        timing = TimingConfig.quick() if quick else TimingConfig(warmup, min_runs, min_time, max_time)
    except ValueError as e:
        raise InputError(f"timing options: {e}") from None
    src = Source.resolve(source)
    if threads:
        import torch

        torch.set_num_threads(threads)
    machine = describe_machine()
    with tempfile.TemporaryDirectory(prefix="smlp-bench-") as work:
        rows = run_sweep(src, specs, batches, seqs, timing, threads, progress=not no_progress,
                         workdir=Path(work), dtypes=dtype_list)
        click.echo(f"machine: {short_description(machine)}")
        click.echo(format_table(rows))
        profiles = _profile(src, specs, rows, threads, profile_runs) if profile else []
    report = make_report(rows, machine, {"timing": timing.to_dict(), "threads": threads,
                                         "source": str(src.path) if src.path else "default",
                                         "source_kind": src.kind, "backends": [s.name for s in specs],
                                         "batch": batches, "seq": seqs, "dtype": list(dtype_list)},
                             profiles=profiles, command=" ".join(["smlp", *sys.argv[1:]]))
    if json_path:
        write_json(report, json_path)
        click.echo(f"wrote {json_path}")
    if plot_path:
        if not any(r["status"] == "ok" for r in rows):
            raise InputError("--plot: no backend produced a measurement (all skipped/failed)")
        write_plot(rows, plot_path, title=short_description(machine))
        click.echo(f"wrote {plot_path}")


def _profile(src, specs, rows, threads, runs):
    """Profile each ONNX Runtime backend that ran, at the largest (batch, seq) it measured."""
    from smlp_export.bench.profile import format_profile, profile_onnx
    from smlp_export.bench.sweep import _corpus_of, real_token_ids

    jobs = [(spec, target, dtype, onnx) for spec in specs if spec.runtime == "ort"
            for (target, dtype), onnx in src.onnx.items() if target in (spec.target, "file")]
    out = []
    for spec, target, dtype, onnx in jobs:
        ok = [r for r in rows if r["backend"] == spec.name and r["status"] == "ok"
              and (target == "file" or r["dtype"] == dtype)]
        if not ok:
            continue
        b, t = max(r["batch"] for r in ok), max(r["seq"] for r in ok)
        summary = profile_onnx(onnx, real_token_ids(b, t, _corpus_of(src)), runs=runs,
                               provider=spec.provider, intra_op_threads=threads)
        summary.update(backend=spec.name, target=target, dtype=dtype)
        click.echo(format_profile(summary))
        out.append(summary)
    return out
