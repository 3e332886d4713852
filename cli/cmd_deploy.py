"""``smlp deploy``: an export directory -> a serving runtime's model repository."""
from __future__ import annotations

import click

from .options import force_option


@click.command("deploy")
@click.argument("export_dir", metavar="OUT")
@click.option("--runtime", type=click.Choice(["triton"]), default="triton", show_default=True,
              help="Serving runtime to write for (Triton Inference Server, onnxruntime backend).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Model repository directory to create.")
@click.option("--backend", type=click.Choice(["onnxruntime", "python"]), default="onnxruntime", show_default=True,
              help="Triton backend: onnxruntime, or python (an ONNX Runtime session in the python backend).")
@click.option("--name", default="smlp", show_default=True, help="Model name in the repository.")
@click.option("--instances", default=1, show_default=True, type=int, help="Model instances.")
@click.option("--gpu", is_flag=True, help="Place instances on GPUs (KIND_GPU) instead of CPUs.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="ONNX Runtime intra-op threads per instance (0 = runtime default).")
@click.option("--check", is_flag=True,
              help="Start a local tritonserver (serve extra; python backend) and compare its logits with the export.")
@click.option("--sequence-batch", type=click.IntRange(1), default=None,
              help="onnxruntime backend, export with --decode: most sequences the <name>_sequence model "
                   "steps in one batch (Triton sequence batcher; default 8).")
@click.option("--sequence-candidates", type=click.IntRange(1), default=None,
              help="Sequences in flight per instance of <name>_sequence (oldest strategy; default 64).")
@force_option
def deploy(export_dir, runtime, output, backend, name, instances, gpu, threads, check, force,
           sequence_batch, sequence_candidates) -> None:
    """Write a model repository for OUT (refuses exports that failed parity)."""
    from smlp_export.deploy import write_triton_repository
    from smlp_export.errors import SMLPError

    if check and backend != "python":  # refused before anything is written
        raise SMLPError("--check needs --backend python (the local tritonserver has only the python backend)")
    rec = write_triton_repository(export_dir, output, name=name, instances=instances, gpu=gpu,
                                  intra_op_threads=threads, backend=backend, force=force,
                                  sequence={"max_batch_size": sequence_batch,
                                            "max_candidate_sequences": sequence_candidates})
    for w in rec.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    for m in rec["models"]:
        ins = ", ".join(f"{t['name']}{t['dims']}" for t in m["inputs"])
        click.echo(f"{output}/{m['name']}: {m['file']} ({rec['target']}, {rec['dtype']}) inputs {ins}")
    click.echo(f"serve with: tritonserver --model-repository {output}")
    if check:
        from smlp_export.deploy.server import check_repository

        res = check_repository(output, export_dir, model=name)
        for row in res["cases"]:
            click.echo(f"  served B={row['batch']} T={row['seq']}: max |served - local| = {row['max_abs_err']:.3g}")
        if not res["passed"]:
            raise SMLPError(f"served logits differ from the export by {res['max_abs_err']:.3g}")
        click.echo("check passed: the server returns the export's logits exactly")
