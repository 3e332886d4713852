"""``smlp build-engine``: a TensorRT engine from a ``--target tensorrt`` export (needs TensorRT)."""
from __future__ import annotations

import click


@click.command("build-engine")
@click.argument("export_dir", metavar="OUT")
@click.option("-o", "--output", default=None, type=click.Path(), help="Engine file (default: OUT/model.engine).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1), help="Profile upper bound for batch.")
def build_engine(export_dir, output, precision, max_batch) -> None:
    """Build a TensorRT engine with the smlp plugins (smlp_export/plugins/) from OUT/model.onnx.

    The sequence bound of the optimization profile is the model's max_seq_len from OUT/manifest.json.
    Needs TensorRT >= 10.10 (the `tensorrt` extra).
    """
    import json
    from pathlib import Path

    from smlp_export.errors import SMLPError

    out = Path(export_dir)
    man = out / "manifest.json"
    if not man.is_file():
        raise SMLPError(f"{out} is not an export directory (no manifest.json)")
    manifest = json.loads(man.read_text())
    if manifest.get("target") != "tensorrt":
        raise SMLPError(f"{out} was exported with --target {manifest.get('target')}; "
                        "TensorRT engines need --target tensorrt (plugin nodes)")
    from smlp_export.plugins import build_engine as mod
    try:
        path = mod.build_engine(out / "model.onnx", Path(output) if output else out / "model.engine",
                                precision=precision, max_batch=max_batch,
                                max_seq=int(manifest["config"]["max_seq_len"]))
    except (mod.TensorRTUnavailable, RuntimeError, FileNotFoundError) as e:
        raise SMLPError(str(e).splitlines()[0]) from None
    click.echo(f"wrote {path}")
