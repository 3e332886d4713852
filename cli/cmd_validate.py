"""``smlp validate OUT``: numeric parity of an export against PyTorch on real held-out text."""
from __future__ import annotations

import sys

import click

from .options import json_flag, parse_providers, quiet_option


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _report_saved(out: str, report, save_inputs: str | None, save_outputs: str | None, providers) -> None:
    """Where --save-inputs/--save-outputs wrote, and the polygraphy command that replays the check
    (on stderr, so --json output stays one document)."""
    import os

    from smlp_export.fsutil import show_path

    poly = report.polygraphy
    if poly is None:
        return
    if save_inputs:
        click.echo(f"wrote {show_path(save_inputs)}: {poly['cases']} input feeds (polygraphy --load-inputs)", err=True)
    if save_outputs:
        click.echo(f"wrote {show_path(save_outputs)}: PyTorch's outputs on them (polygraphy --load-outputs)", err=True)
    if save_inputs and save_outputs:
        from smlp_export.artifacts import MODEL_FILE
        from smlp_export.validate.polygraphy_io import polygraphy_command

        cmd = polygraphy_command(os.path.join(out, MODEL_FILE), save_inputs, save_outputs, poly["atol"],
                                 list(providers) or None)
        click.echo("replay with Polygraphy (per-output bounds from the tolerance table; docs/validation.md):", err=True)
        click.echo(f"  {cmd}", err=True)
    else:
        click.echo("polygraphy run needs both files: give --save-inputs and --save-outputs together", err=True)


@click.command("validate")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--backend", type=click.Choice(["ort", "reference", "tensorrt"]), default="ort", show_default=True,
              help="ort: ONNX Runtime; reference: onnx.reference.ReferenceEvaluator (independent, slow: small cases); "
                   "tensorrt: a TensorRT engine of a --target tensorrt export, run by Polygraphy (needs TensorRT).")
@click.option("--engine", default=None, type=click.Path(dir_okay=False), metavar="ENGINE",
              help="--backend tensorrt: the engine file (default OUT/model.engine if it exists, else one is built "
                   "in a temporary folder). Its ENGINE.json must name OUT's model.onnx.")
@click.option("--checkpoint", default=None, metavar="CKPT",
              help="Checkpoint to compare with (default: the one named in manifest.json; its sha256 must match).")
@click.option("--quick", is_flag=True,
              help="Fewer cases (what `smlp export --quick` runs; a plain `smlp export` runs the full set).")
@click.option("--provider", "providers", multiple=True, metavar="NAME",
              help="ONNX Runtime execution provider (repeatable; default CPUExecutionProvider). No silent fallback.")
@click.option("--providers", "providers_list", multiple=True, metavar="P1,P2", callback=parse_providers,
              help="Polygraphy's spelling of --provider: comma-separated, short names allowed (cpu, cuda, tensorrt).")
@click.option("--bisect", "bisect", is_flag=True,
              help="Also compare every block's output (tMoE / sMoE inside sparse blocks) with PyTorch and "
                   "name the first divergence (on a temporary copy of the graph).")
@click.option("--bisect-mode", type=click.Choice(["auto", "all", "each"]), default="auto", show_default=True,
              help="all: one session exposing every block; each: one block per session (large models); "
                   "auto: each above 512 MiB of graph + weights.")
@click.option("--save-inputs", default=None, metavar="F.json",
              help="Write the validation inputs as Polygraphy feed dicts (polygraphy run --load-inputs).")
@click.option("--save-outputs", default=None, metavar="G.json",
              help="Write PyTorch's outputs on them as a Polygraphy RunResults (polygraphy run --load-outputs).")
@click.option("--atol", type=float, default=None,
              help="Absolute allowance on logits errors: a case passes if max|diff| <= atol + rtol * scale (default 0).")
@click.option("--rtol", type=float, default=None,
              help="Logits error bound relative to their scale, instead of the dtype table's (a looser one is flagged).")
@quiet_option
@json_flag
def validate(out, backend, engine, checkpoint, quick, providers, providers_list, bisect, bisect_mode, save_inputs,
             save_outputs, atol, rtol, quiet, as_json) -> None:
    """Compare OUT (an export folder) with PyTorch; write OUT/parity.json; exit 0 only if it passes."""
    from smlp_export.validate import run_validation

    providers = tuple(providers) + tuple(providers_list)
    if providers:
        import onnxruntime

        # ORT's C++ logger prints multi-line errors when a provider cannot load; the runner turns
        # that into one line ("fell back from ..."), so keep only fatal messages in this process.
        onnxruntime.set_default_logger_severity(4)
    report = run_validation(out, backend, checkpoint=checkpoint, quick=quick,
                            providers=list(providers) or None, progress=not (quiet or as_json) and sys.stderr.isatty(),
                            bisect=bisect_mode if bisect else None, save_inputs=save_inputs,
                            save_outputs=save_outputs, atol=atol, rtol=rtol, engine=engine)
    _report_saved(out, report, save_inputs, save_outputs, providers)
    if as_json:
        click.echo(report.to_json())
    else:
        m = report.metrics
        click.echo(f"parity  {report.backend} on {report.target} / {report.dtype}  "
                   f"({len(report.cases)} cases, {report.time_s:.1f} s)  -> {out}/parity.json")
        rows = [("metric", "value", "tolerance", "ok")]
        rows += [(c["name"], _fmt(c["value"]), c["limit"], "ok" if c["ok"] else "FAIL") for c in report.checks]
        ra = m["routing_agreement"]
        rows += [("max_abs_err", _fmt(m["max_abs_err"]), f"scale {_fmt(m['logits_scale'])}", ""),
                 ("mean_abs_err", _fmt(m["mean_abs_err"]), "", ""),
                 ("top1 ties", f"{m['top1_ties']}/{m['top1_positions']}", "", ""),
                 ("routing_agreement", _fmt(ra["overall"]), f"{ra['ties']} ties, {ra['tie_flips']} tie flips", ""),
                 ("ppl torch / backend", f"{_fmt(m['ppl_reference'])} / {_fmt(m['ppl_backend'])}", "", "")]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            click.echo("  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip())
        if report.bisect is not None:
            from smlp_export.validate.bisect import table_lines

            for line in table_lines(report.bisect):
                click.echo(line)
        ov = report.tolerance_overrides
        if ov is not None:
            click.echo(f"{'LOOSER TOLERANCES' if ov['looser'] else 'tolerances'}: atol {ov['atol']:g}, "
                       f"rtol {ov['rtol']:g} ({ov['note']})")
        for f in report.failures:
            click.echo(f"FAIL {f}", err=True)
        looser = report.tolerance_overrides is not None and report.tolerance_overrides["looser"]
        click.echo(("PASSED" if report.passed else "FAILED") + (" (with tolerances looser than the table)" if looser else ""))
    if not report.passed:
        sys.exit(1)
