"""``smlp deploy``: an export directory -> a serving runtime's model repository."""
from __future__ import annotations

import click

from .options import FiniteFloat, force_option


def _sizes(ctx, param, value):
    """'2,4,8' -> (2, 4, 8); None when not given."""
    if value is None:
        return None
    from smlp_export.errors import InputError

    try:
        sizes = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--preferred-batch-sizes must be comma-separated integers like 2,4,8, got {value!r}") from None
    if not sizes:
        raise InputError("--preferred-batch-sizes is empty")
    return sizes


def _concurrency(ctx, param, value):
    if value is None:
        return None
    from smlp_export.deploy.load import parse_concurrency

    return parse_concurrency(value)


def _concurrency_range(ctx, param, value):
    if value is None:
        return None
    from smlp_export.deploy.load import parse_concurrency_range

    return parse_concurrency_range(value)


@click.command("deploy")
@click.argument("export_dir", metavar="OUT")
@click.option("--runtime", type=click.Choice(["triton"]), default="triton", show_default=True,
              help="Serving runtime to write for (Triton Inference Server, onnxruntime backend).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Model repository directory to create.")
@click.option("--backend", type=click.Choice(["onnxruntime", "python"]), default="onnxruntime", show_default=True,
              help="Triton backend: onnxruntime, or python (an ONNX Runtime session in the python backend).")
@click.option("--name", default="smlp", show_default=True, help="Model name in the repository.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1), help="Model instances.")
@click.option("--gpu", is_flag=True, help="Place instances on GPUs (KIND_GPU) instead of CPUs.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="ONNX Runtime intra-op threads per instance (0 = runtime default).")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(0),
              help="Triton dynamic batching of the full-sequence model: most rows per execution (0 = no batching).")
@click.option("--preferred-batch-sizes", default=None, callback=_sizes, metavar="B1,B2,..",
              help="Batch sizes the dynamic batcher aims for [default: powers of two up to --max-batch-size].")
@click.option("--queue-delay-us", default=0, show_default=True, type=click.IntRange(0),
              help="Longest a request waits for others to batch with. 0: requests that arrive while the model "
                   "runs are still batched, and a lone client waits for nothing (docs/deploy.md).")
@click.option("--check", is_flag=True,
              help="Start a local tritonserver (serve extra), compare its logits with the export and check bad "
                   "requests get error responses. The local server has only the python backend: an onnxruntime "
                   "repository is checked through its python-backend twin (same graphs and batching).")
@click.option("--concurrency", default=None, callback=_concurrency, metavar="C1,C2,..",
              help="With --check: a load sweep, e.g. 1,4,16 concurrent clients sending held-out requests.")
@click.option("--concurrency-range", default=None, callback=_concurrency_range, metavar="START:END[:STEP]",
              help="perf_analyzer's spelling of --concurrency: 1:16:4 sweeps 1,5,9,13 (STEP defaults to 1).")
@click.option("--duration", default=5.0, show_default=True, type=FiniteFloat(min=0.1),
              help="Seconds of load per concurrency.")
@click.option("--requests", "n_requests", default=None, type=click.IntRange(1),
              help="Requests per concurrency instead of --duration.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="With --check: write the check and load rows (under 'load') as JSON here.")
@click.option("--sequence-batch", type=click.IntRange(1), default=None,
              help="Export with --decode: most sequences the <name>_sequence model steps in one batch "
                   "(Triton sequence batcher; default 8).")
@click.option("--sequence-candidates", type=click.IntRange(1), default=None,
              help="Sequences in flight per instance of <name>_sequence (oldest strategy; default 64).")
@click.option("--sequence-idle-us", type=click.IntRange(1), default=None,
              help="<name>_sequence: a sequence idle this long without END is evicted (its slot freed, its state "
                   "dropped; default 5000000 = 5 s). While every candidate slot is held, a new sequence waits "
                   "up to this long (docs/decode.md).")
@force_option
def deploy(export_dir, runtime, output, backend, name, instances, gpu, threads, max_batch_size,
           preferred_batch_sizes, queue_delay_us, check, concurrency, concurrency_range, duration, n_requests,
           json_path, sequence_batch, sequence_candidates, sequence_idle_us, force) -> None:
    """Write a Triton model repository for OUT (refuses exports that failed parity).

    \b
    Models: <name> (full sequence, dynamic batching); for an export made with --decode also
    <name>_sequence (sequence batcher, decode state kept on the server) and, with --backend
    python, <name>_decode (client-kept state) and <name>_generate (token streaming, see
    `smlp generate --server`). The repository is self-contained; its README.md says how to run
    it (NGC container, instances). --check serves it locally and compares every response with
    the export; --concurrency adds a load sweep (docs/deploy.md).
    """
    from smlp_export.deploy import write_triton_repository
    from smlp_export.errors import SMLPError

    # every refusal before anything is written
    if concurrency and concurrency_range:
        raise SMLPError("give --concurrency or --concurrency-range, not both")
    concurrency = concurrency or concurrency_range
    if (concurrency or json_path) and not check:
        raise SMLPError(f"{'--concurrency' if concurrency else '--json'} needs --check (it serves the repository)")
    if check:
        from smlp_export.deploy.server import find_pytriton

        find_pytriton()  # the serve extra is missing: say so now, not after writing the repository
    options = dict(name=name, instances=instances, gpu=gpu, intra_op_threads=threads,
                   max_batch_size=max_batch_size, preferred_batch_sizes=preferred_batch_sizes,
                   queue_delay_us=queue_delay_us,
                   sequence={"max_batch_size": sequence_batch, "max_candidate_sequences": sequence_candidates,
                             "max_sequence_idle_us": sequence_idle_us})
    rec = write_triton_repository(export_dir, output, backend=backend, force=force, **options)
    for w in rec.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    for m in rec["models"]:
        ins = ", ".join(f"{t['name']}{t['dims']}" for t in m["inputs"])
        click.echo(f"{output}/{m['name']}: {m['file']} ({rec['target']}, {rec['dtype']}) inputs {ins}"
                   + (f", batching up to {m['max_batch_size']}" if m.get("max_batch_size") else ""))
    click.echo(f"serve with: tritonserver --model-repository {output}  (see {output}/README.md)")
    if not check:
        return
    import tempfile
    from pathlib import Path

    from smlp_export.deploy.load import table_lines
    from smlp_export.deploy.server import check_repository

    with tempfile.TemporaryDirectory(prefix="smlp-check-") as tmp:
        served = output
        if backend != "python":
            served = Path(tmp) / "repo"
            write_triton_repository(export_dir, served, backend="python", **options)
            click.echo(f"checking through a python-backend twin of {output} (same graphs and batching): the local "
                       "tritonserver has no onnxruntime backend")
        res = check_repository(served, export_dir, model=name, concurrency=concurrency,
                               duration_s=None if n_requests else duration,
                               requests=n_requests, progress=lambda msg: click.echo(f"  {msg}"))
    if res["load"]:
        click.echo("\n".join(table_lines(res["load"])))
    if json_path:
        from smlp_export.bench.machine import describe_machine
        from smlp_export.bench.report import write_json

        write_json({"format_version": 1, "repository": str(output), "served_backend": "python", "model": name, "deploy": rec,
                    "machine": describe_machine(), "check": {k: v for k, v in res.items() if k != "load"},
                    "load": res["load"]}, json_path)
        click.echo(f"wrote {json_path}")
    if not res["passed"]:
        first = next((r for r in res["cases"] if not r["passed"]), None)
        bad = next((r for r in res["bad_input"] if not r["passed"]), None)
        load = next((r for r in res["load"] if r["errors"] or r["mismatches"]), None)
        gen = res.get("generate") and next((c for c in res["generate"]["cases"] if not c["equal"]), None)
        why = (f"served logits differ from the export by {first['max_err_rel']:.3g} of scale (bound {res['bound']:.3g})"
               if first else f"bad input not answered correctly: {bad['case']}" if bad else
               f"served generation differs from local generation (temperature {gen['temperature']}, "
               f"seed {gen['seed']})" if gen else
               f"load at concurrency {load['concurrency']}: {load['errors']} errors, {load['mismatches']} mismatches "
               f"({load['first_error'] or load['first_mismatch']})")
        raise SMLPError(f"check failed: {why}")
    click.echo("check passed: every served response equals the export's in-process logits within "
               f"{res['bound']:.3g} of scale; bad requests get error responses"
               + ("; served generation equals local generation token for token" if res.get("generate") else ""))
