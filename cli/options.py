"""Option groups shared by several commands (defined once, stacked by each command)."""
from __future__ import annotations

import click

checkpoint_argument = click.argument("checkpoint", required=False, default=None, metavar="[CKPT]")
allow_pickle_option = click.option("--allow-pickle", is_flag=True,
                                   help="Allow a pickled .pt checkpoint (loaded with weights_only=True).")
json_flag = click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of a table.")
force_option = click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")


def with_checkpoint(f):
    """[CKPT] argument (default: the embedded default model) + --allow-pickle."""
    return checkpoint_argument(allow_pickle_option(f))
