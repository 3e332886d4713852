"""``smlp convert``: import a checkpoint trained elsewhere (today: g-mlp-pytorch) as a checkpoint directory."""
from __future__ import annotations

import click

from .options import force_option, json_flag


@click.command("convert")
@click.argument("src", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(), help="Checkpoint directory to create.")
@click.option("--from", "source_format", required=True, type=click.Choice(["g-mlp-pytorch"]),
              help="What SRC is: g-mlp-pytorch = a gMLP(num_tokens=...) state dict saved with torch.save "
                   "(with or without AutoregressiveWrapper's 'net.' prefix), or the same as .safetensors.")
@click.option("--causal/--no-causal", default=False, show_default=True,
              help="Was SRC built with gMLP(causal=True)? The weights do not say; g-mlp-pytorch's default is "
                   "non-causal, which cannot be converted.")
@click.option("--act", default="identity", show_default=True,
              help="The gMLP act= module SRC was built with (only identity, the library's default, converts).")
@click.option("--shift-tokens", default=0, show_default=True, type=click.IntRange(0),
              help="The gMLP shift_tokens= SRC was built with (only 0, the library's default, converts).")
@click.option("--eos-token-id", default=None, type=click.IntRange(0),
              help="Token id that ends generation (default: none; generation stops on length).")
@click.option("--no-check", is_flag=True,
              help="Skip comparing the converted model with a plain-torch twin of the source's forward.")
@force_option
@json_flag
def convert(src, output, source_format, causal, act, shift_tokens, eos_token_id, no_check, force, as_json) -> None:
    """Convert SRC into a checkpoint directory -o CKPT (written only if every check passes).

    Every size (vocabulary, dim, dim_ff, seq_len, depth, heads) is read from the weights' shapes.
    What this model cannot represent exactly (heads > 1, attn_dim, circulant matrices, an
    activation on the gate, shift_tokens, non-causal) is refused with the reason.
    """
    import json
    import shlex
    import sys

    from smlp_export.convert import convert_checkpoint

    res = convert_checkpoint(src, output, source_format=source_format, causal=causal, act=act,
                             shift_tokens=shift_tokens, eos_token_id=eos_token_id, overwrite=force,
                             check=not no_check, command=shlex.join(["smlp", *sys.argv[1:]]))
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
        return
    c = res.config
    check = ("skipped" if res.check_max_abs_diff is None else
             f"max |diff| {res.check_max_abs_diff:.2e} at logit scale {res.check_scale:.3g}")
    click.echo(f"wrote {output}: {res.num_parameters:,} parameters from {source_format} "
               f"(layout {res.layout}{', prefix ' + res.prefix if res.prefix else ''}): vocab {c.vocab_size}, "
               f"dim {c.d_model}, dim_ff {c.d_ffn}, seq_len {c.max_seq_len}, depth {c.n_layers}; check {check}")
    if res.ignored:
        click.echo(f"ignored {len(res.ignored)} unused tensors of the source ({res.ignored[0]}, ...)", err=True)
