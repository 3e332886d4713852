"""``smlp export``: checkpoint -> ONNX for ONNX Runtime, TensorRT or any runtime, validated."""
from __future__ import annotations

import click

from .options import force_option, json_flag, quiet_option, with_checkpoint


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@click.command("export")
@with_checkpoint
@click.option("-o", "--output", required=True, type=click.Path(), help="Output directory (must not exist without --force).")
@click.option("--target", default="ort", show_default=True, metavar="ort|tensorrt|portable",
              help="ort: fused com.microsoft.MoE for ONNX Runtime; tensorrt: smlp plugin nodes + local "
                   "fallback functions; portable: default-domain ONNX ops only.")
@click.option("--dtype", default=None, metavar="fp32|fp16|bf16",
              help="Compute dtype of the graph (outputs are float32 either way). Default: the "
                   "checkpoint's dtype (a float16 checkpoint exports as fp16; fp32 with --quantize).")
@click.option("--opset", default=None, type=int,
              help="ONNX opset (>= 18; default 18, or 21 for a quantized portable export).")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Check parity against PyTorch before publishing (writes parity.json).")
@click.option("--quick", is_flag=True, help="Quick validation (fewer held-out batches).")
@click.option("--ort-moe", default="auto", show_default=True, metavar="loop|fused|auto",
              help="ort target: token MoE as the sorted per-expert formulation (loop; fastest "
                   "on ORT CPU from 8 tokens on), as com.microsoft.MoE (fused), or auto: an If "
                   "picks fused for <= 4 tokens, loop above (default; docs/export.md has the figures).")
@click.option("--decode", is_flag=True,
              help="Also export the incremental decode graphs (decode.onnx; decode_seq.onnx: one position "
                   "per row, for Triton's sequence batcher).")
@click.option("--quantize", default=None, metavar="int8|int4",
              help="Weight-only quantization: experts through com.microsoft.QMoE and dense layers through "
                   "MatMulNBits (ort), or blockwise DequantizeLinear (portable); validated against a fake-quant "
                   "twin and against the float model (docs/export.md, \"Quantized exports\").")
@click.option("--block-size", default=None, type=int, metavar="32|64|128",
              help="Weights per quantization scale along the input features (default 32; int8 experts: one "
                   "scale per output channel).")
@force_option
@quiet_option
@json_flag
def export(checkpoint, allow_pickle, output, target, dtype, opset, validate, quick, ort_moe, decode, quantize,
           block_size, force, quiet, as_json) -> None:
    """Export CKPT (default: the embedded model) to ONNX in OUTPUT, validate it, print a summary."""
    import json
    import sys

    from tqdm import tqdm

    from smlp_export.artifacts import DECODE_FILE
    from smlp_export.export.pipeline import check_options, export_model

    if opset is None:
        from smlp_export.export.pipeline import DEFAULT_OPSET
        from smlp_export.quantize import MIN_OPSET_DQ

        opset = MIN_OPSET_DQ if (quantize and target == "portable") else DEFAULT_OPSET
    check_options(target, dtype, opset, ort_moe, quantize, block_size)  # fail before the progress bar appears
    stages = ["load", "trace + translate", "save", "check"] + (["decode graph"] if decode else []) \
        + (["validate"] if validate else []) + ["publish"]
    # stderr; None: tqdm shows it only on a terminal
    bar = tqdm(total=len(stages), desc="export", unit="stage", leave=False, disable=True if quiet else None)

    def progress(stage: str) -> None:
        if stage != "load":
            bar.update(1)
        bar.set_description(f"export: {stage}")

    try:
        res = export_model(checkpoint, output, target=target, dtype=dtype, opset=opset, force=force,
                           validate=validate, quick=quick, decode=decode, ort_moe=ort_moe, quantize=quantize,
                           block_size=block_size, allow_pickle=allow_pickle,
                           progress=progress, validate_progress=not quiet and sys.stderr.isatty())
        bar.update(bar.total - bar.n)
    finally:
        bar.close()

    m = res.manifest
    if res.parity.startswith("skipped (smlp_export.validate"):
        click.echo("warning: parity was not checked (smlp_export.validate is not available)", err=True)
    if as_json:
        click.echo(json.dumps({"output": str(res.out_dir), "target": m["target"], "dtype": m["dtype"],
                               "opset": m["opset"], "model_bytes": res.model_bytes, "nodes": res.node_counts,
                               "parity": res.parity, "seconds": round(res.seconds, 2),
                               "stage_seconds": res.stage_seconds}, indent=2))
        return
    top = ", ".join(f"{k} {v}" for k, v in list(res.node_counts.items())[:8])
    more = len(res.node_counts) - 8
    click.echo(f"exported {m['checkpoint']['name']} -> {res.out_dir}")
    moe = f", token MoE {m['ort_moe']}" if m.get("ort_moe") else ""
    if m.get("quantization"):
        q = m["quantization"]
        moe += f", {q['method']} block {q['block_size']}: {q['bits_per_weight']} bits/weight"
    click.echo(f"  target   {m['target']} ({m['dtype']}, opset {m['opset']}, IR {m['ir_version']}{moe})")
    click.echo(f"  size     {_size(res.model_bytes)} ({', '.join(f['name'] for f in m['files'])})")
    click.echo(f"  nodes    {sum(res.node_counts.values())}: {top}" + (f", +{more} more types" if more > 0 else ""))
    if m.get("decode"):
        graphs = [f"{m['decode'].get('file', DECODE_FILE)} (incremental decode)"]
        seq = m["decode"].get("sequence")
        if seq:
            graphs.append(f"{seq['file']} (one position per row: Triton's sequence batcher)")
        click.echo(f"  decode   {', '.join(graphs)}")
    click.echo(f"  parity   {res.parity}")
    click.echo(f"  time     {res.seconds:.1f} s")
