"""``smlp train``: train an sMLP language model (default corpus: the Python stdlib sources)."""
from __future__ import annotations

import click

from .cmd_init import parse_sets
from .options import FiniteFloat, force_option, seed_option


@click.command("train")
@click.option("--preset", "preset_name", default="tiny", show_default=True, help="Architecture preset.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--corpus", default=None, help="Text file or folder (default: the Python standard library's .py files).")
@click.option("--steps", default=2000, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=3e-3, show_default=True, type=FiniteFloat(0, min_open=True))
@click.option("--warmup", default=100, show_default=True, type=click.IntRange(0))
@click.option("--eval-every", default=250, show_default=True, type=click.IntRange(1))
@click.option("--save-every", default=500, show_default=True, type=click.IntRange(1))
@click.option("--threads", default=None, type=click.IntRange(1), help="torch intra-op threads (fixed for determinism).")
@click.option("--resume", is_flag=True, help="Continue from OUT/trainer_state.pt.")
@click.option("--init-from", default=None, metavar="CKPT",
              help="Fine-tune this checkpoint (its config is used; --preset/--set are ignored).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Checkpoint directory to write.")
@seed_option
@force_option
def train(preset_name, sets, corpus, steps, batch_size, lr, warmup, eval_every, save_every, threads,
          resume, init_from, output, seed, force) -> None:
    """Train a model with AdamW + warm-up/cosine; evaluates on held-out text and saves a checkpoint."""
    import json
    from pathlib import Path

    import torch

    from smlp_export import preset
    from smlp_export.errors import SMLPError
    from smlp_export.train import TrainArgs
    from smlp_export.train import train as run_train

    from smlp_export.fsutil import check_output

    out = Path(output)
    # with --resume, a folder without a trainer state is refused by train() itself (one line)
    if out.exists() and not (force or resume):
        raise SMLPError(f"{out} already exists (use --force to overwrite or --resume to continue)")
    # --force replaces only a folder smlp wrote, never the checkpoint or corpus it trains from
    check_output(output, force=True, inputs=[init_from, corpus])
    if threads:
        torch.set_num_threads(threads)
    cfg = None if init_from else preset(preset_name, **parse_sets(sets))
    args = TrainArgs(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, eval_every=eval_every,
                     save_every=save_every, seed=seed, corpus=corpus)
    meta = run_train(cfg, out, args, resume=resume, init_from=init_from, log=lambda m: click.echo(m, err=True))
    h = meta["heldout"]
    click.echo(json.dumps({"output": str(out), "steps": steps, "wall_time_s": meta["wall_time_s"],
                           "heldout_ppl": h["ppl"], "heldout_bits_per_byte": h["bits_per_byte"],
                           "unigram_bits_per_byte": meta["unigram_bits_per_byte"],
                           "expert_load": h["expert_load"]}, indent=2))
