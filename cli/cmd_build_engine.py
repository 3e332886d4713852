"""``smlp build-engine``: a TensorRT engine from a ``--target tensorrt`` export (needs TensorRT)."""
from __future__ import annotations

import math

import click

SHAPES_HELP = "trtexec syntax, e.g. input_ids:1x1 (comma-separated for several inputs)"


def _finite_workspace(ctx: click.Context, param: click.Parameter, value: float) -> float:
    # FloatRange lets nan (every comparison is False) and inf through; TensorRT takes a byte count.
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number of GiB")
    return value


@click.command("build-engine")
@click.argument("export_dir", metavar="OUT")
@click.option("-o", "--output", default=None, type=click.Path(), help="Engine file (default: OUT/model.engine).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1),
              help="Batch upper bound of the default profiles.")
@click.option("--min-shapes", default=None, metavar="SHAPES", help=f"Prefill profile minimum ({SHAPES_HELP}).")
@click.option("--opt-shapes", default=None, metavar="SHAPES", help=f"Prefill profile optimum ({SHAPES_HELP}).")
@click.option("--max-shapes", default=None, metavar="SHAPES",
              help=f"Prefill profile maximum ({SHAPES_HELP}); seq at most the model's max_seq_len.")
@click.option("--decode-profile/--no-decode-profile", default=True, show_default=True,
              help="Add a second profile for decode steps (seq = 1, same batch bounds).")
@click.option("--timing-cache", default=None, type=click.Path(dir_okay=False),
              help="Timing cache file: read if it exists, written back after the build (faster rebuilds).")
@click.option("--workspace-gib", default=4.0, show_default=True, callback=_finite_workspace,
              type=click.FloatRange(min=0.0, min_open=True), help="TensorRT workspace memory limit.")
@click.option("--dry-run", is_flag=True, help="Print the build plan (profiles, plugins) as JSON and stop; needs no TensorRT.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def build_engine(export_dir, output, precision, max_batch, min_shapes, opt_shapes, max_shapes, decode_profile,
                 timing_cache, workspace_gib, dry_run, quiet) -> None:
    """Build a TensorRT engine with the smlp plugins from OUT/model.onnx.

    Two optimization profiles by default: 0 = prefill (batch 1..--max-batch, seq 1..n, n = the
    model's max_seq_len from OUT/manifest.json) and 1 = decode (seq = 1). --min/--opt/--max-shapes
    replace the prefill profile's bounds. Writes the engine and, next to it, its build manifest
    <engine>.json (default OUT/model.engine.json: TensorRT version, GPU, precision, profiles,
    plugins, the export's model sha256).
    Needs TensorRT >= 10.10 (the `tensorrt` extra); the plugins ship in the wheel (package
    smlp_plugins, plugins/ in the source tree).
    """
    import io
    import json
    import sys
    from pathlib import Path

    from smlp_export import engine_plan as plan
    from smlp_export.artifacts import ENGINE_FILE, MANIFEST_FILE, MODEL_FILE, Manifest, is_export_dir
    from smlp_export.errors import SMLPError

    out = Path(export_dir)
    if not is_export_dir(out):
        raise SMLPError(f"{out} is not an export directory (no {MANIFEST_FILE})")
    man = Manifest.read(out)
    man.verify_files()  # the engine is built from the bytes that were exported (and nothing outside)
    manifest = man.to_dict()
    if man.target != "tensorrt":
        raise SMLPError(f"{out} was exported with --target {man.target}; "
                        "TensorRT engines need --target tensorrt (plugin nodes)")
    # Every option is checked before TensorRT is touched (one line per mistake).
    profiles = plan.engine_profiles(
        manifest, max_batch=max_batch, decode=decode_profile,
        min_shapes=plan.parse_shapes(min_shapes, "--min-shapes"), opt_shapes=plan.parse_shapes(opt_shapes, "--opt-shapes"),
        max_shapes=plan.parse_shapes(max_shapes, "--max-shapes"))
    plan.read_timing_cache(timing_cache)
    engine = Path(output) if output else out / ENGINE_FILE
    if dry_run:
        click.echo(json.dumps({"onnx": str(out / MODEL_FILE), "engine": str(engine),
                               "manifest": str(plan.manifest_path(engine)), "precision": precision,
                               "profiles": [p.to_dict() for p in profiles],
                               "plugins": plan.plugin_inventory(out / MODEL_FILE),
                               "timing_cache": timing_cache}, indent=2))
        return
    from smlp_plugins import build_engine as mod

    printer = plan.ProgressPrinter(io.StringIO() if quiet else sys.stderr)
    try:
        path, info = mod.build_engine_with_profiles(
            out / MODEL_FILE, engine, profiles=profiles, export_manifest=manifest, precision=precision,
            timing_cache=timing_cache, workspace_gib=workspace_gib, printer=printer)
    except (mod.TensorRTUnavailable, RuntimeError, FileNotFoundError, ValueError) as e:
        raise SMLPError(str(e).splitlines()[0]) from None
    click.echo(f"wrote {path} and {plan.manifest_path(path).name} (TensorRT {info['tensorrt_version']}, "
               f"{len(profiles)} profiles)")
