"""``smlp inspect``: config, parameter counts, blocks and routing, held-out ppl and expert load."""
from __future__ import annotations

import click

from .options import json_flag, with_checkpoint


@click.command("inspect")
@with_checkpoint
@click.option("--heldout/--no-heldout", default=True, show_default=True,
              help="Run the model on held-out text: perplexity, bits per byte, expert load.")
@click.option("--windows", default=64, show_default=True, type=click.IntRange(1),
              help="Held-out windows of max_seq_len tokens to evaluate.")
@json_flag
def inspect(checkpoint, allow_pickle, heldout, windows, as_json) -> None:
    """Show a checkpoint's config, sizes, routing and expert load (default: the embedded model);
    for an export folder or a .onnx file: its graph(s), I/O, plugins, weights, manifest and parity."""
    import json

    from smlp_export.inspect_export import describe_export, export_lines, is_export

    if is_export(checkpoint):
        d = describe_export(checkpoint)
        click.echo(json.dumps(d, indent=2, default=str) if as_json else "\n".join(export_lines(d)))
        return

    from smlp_export import load_checkpoint
    from smlp_export.inspect import describe, histogram_lines

    model = load_checkpoint(checkpoint, allow_pickle=allow_pickle)
    d = describe(model, heldout=heldout, windows=windows)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    cfg = d["config"]
    click.echo(f"checkpoint  {d['path']}")
    click.echo(f"sha256      {d['weights_sha256']}")
    click.echo(f"parameters  {d['parameters']['total']:,} total, {d['parameters']['active_per_token']:,} active per token")
    click.echo(f"shape       d_model={cfg['d_model']} layers={cfg['n_layers']} (sparse {cfg['n_sparse']}) "
               f"max_seq_len={cfg['max_seq_len']} d_ffn={cfg['d_ffn']} vocab={cfg['vocab_size']}")
    click.echo("blocks")
    for b in d["blocks"]:
        click.echo(f"  {b['index']:>2d} {b['kind']:<6s} {b['routing']}")
    m = d["metadata"]
    if m.get("kind") == "trained":
        h = m["heldout"]
        rec = f" over {h['tokens']:,} tokens" if "tokens" in h else ""
        click.echo(f"trained     {m['steps']} steps in {m['wall_time_s']} s; recorded held-out ppl {h['ppl']:.3f}, "
                   f"{h['bits_per_byte']:.3f} bits/byte{rec} at the end of training "
                   f"(unigram {m['unigram_bits_per_byte']:.3f})")
    if heldout:
        ev = d["heldout_eval"]
        click.echo(f"held-out    ppl {ev['ppl']:.3f}, {ev['bits_per_byte']:.3f} bits/byte over {ev['tokens']:,} tokens "
                   f"(the first {windows} held-out windows)")
        if m.get("kind") == "trained" and m["heldout"].get("tokens") not in (None, ev["tokens"]):
            # same text, same model: only the sample differs (the recorded figure used more windows)
            per = ev["tokens"] // windows
            want = m["heldout"]["tokens"] // per if per else None
            again = f"; --windows {want} reproduces it" if want and want * per == m["heldout"]["tokens"] else ""
            click.echo(f"            differs from the recorded ppl by sample: {ev['tokens']:,} of the "
                       f"{m['heldout']['tokens']:,} held-out tokens it was measured on{again}")
        for name, load in ev["expert_load"].items():
            click.echo(f"expert load {name}")
            for line in histogram_lines(load):
                click.echo(line)
