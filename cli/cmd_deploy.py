"""``smlp deploy``: an export directory -> a serving runtime's model repository."""
from __future__ import annotations

import click

from .options import force_option


@click.command("deploy")
@click.argument("export_dir", metavar="OUT")
@click.option("--runtime", type=click.Choice(["triton"]), default="triton", show_default=True,
              help="Serving runtime to write for (Triton Inference Server, onnxruntime backend).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Model repository directory to create.")
@click.option("--name", default="smlp", show_default=True, help="Model name in the repository.")
@click.option("--instances", default=1, show_default=True, type=int, help="Model instances.")
@click.option("--gpu", is_flag=True, help="Place instances on GPUs (KIND_GPU) instead of CPUs.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="ONNX Runtime intra-op threads per instance (0 = runtime default).")
@force_option
def deploy(export_dir, runtime, output, name, instances, gpu, threads, force) -> None:
    """Write a model repository for OUT (refuses exports that failed parity)."""
    from smlp_export.deploy import write_triton_repository

    rec = write_triton_repository(export_dir, output, name=name, instances=instances, gpu=gpu,
                                  intra_op_threads=threads, force=force)
    for m in rec["models"]:
        ins = ", ".join(f"{t['name']}{t['dims']}" for t in m["inputs"])
        click.echo(f"{output}/{m['name']}: {m['file']} ({rec['target']}, {rec['dtype']}) inputs {ins}")
    click.echo(f"serve with: tritonserver --model-repository {output}")
