"""``smlp init``: a randomly initialised checkpoint of any valid config."""
from __future__ import annotations

import click

from .options import force_option, seed_option


def parse_sets(pairs: tuple[str, ...]) -> dict:
    """``key=value`` pairs; values parsed as JSON when possible (ints, floats, true/null), else strings."""
    import json

    from smlp_export.errors import ConfigError

    out = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


@click.command("init")
@click.option("--preset", "preset_name", default="tiny", show_default=True, help="Base architecture: tiny, micro, small, 100m, 350m, 1.5b, 3.5b, 9.4b (docs/model.md).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Checkpoint directory to create.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="dtype of the saved weights (fp16/bf16 load and export as half, never inflated).")
@seed_option
@force_option
def init(preset_name: str, sets: tuple[str, ...], output: str, dtype: str, seed: int, force: bool) -> None:
    """Create a randomly initialised checkpoint (for trying architectures and for tests).

    Streamed: each tensor is drawn and written straight into model.safetensors (never the whole
    model in memory); the files equal those of the model built under the same --seed."""
    from tqdm import tqdm

    from smlp_export import preset
    from smlp_export.checkpoint import init_checkpoint
    from smlp_export.init_weights import file_bytes
    from smlp_export.memory import num_active_parameters, num_parameters, require
    from smlp_export.precision import COMPUTE_DTYPES

    cfg = preset(preset_name, **parse_sets(sets))
    require(cfg, "init", what="smlp init")  # before writing: a clear error, not an OOM kill
    torch_dtype = COMPUTE_DTYPES[dtype]
    with tqdm(total=file_bytes(cfg, torch_dtype), unit="B", unit_scale=True, desc="smlp init", leave=False,
              disable=None) as bar:
        init_checkpoint(cfg, output, seed=seed, dtype=torch_dtype, overwrite=force, progress=bar.update,
                        metadata={"kind": "random-init", "preset": preset_name, "seed": seed})
    click.echo(f"wrote {output}: {num_parameters(cfg):,} parameters "
               f"({num_active_parameters(cfg):,} active per token), sparse blocks {cfg.sparse_layer_ids()}")
