"""Entry point: ``smlp <command>``. Errors are one line; ``--debug`` shows the traceback."""
from __future__ import annotations

import importlib
import sys

import click

# name -> (module, attribute). Commands are imported only when used, so one broken optional
# dependency never breaks the others (or --help).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "init": ("smlp_cli.cmd_init", "init", "Create a randomly initialised checkpoint."),
    "train": ("smlp_cli.cmd_train", "train", "Train an sMLP language model on text."),
    "convert": ("smlp_cli.cmd_convert", "convert", "Import a checkpoint trained elsewhere (g-mlp-pytorch) as a checkpoint."),
    "inspect": ("smlp_cli.cmd_inspect", "inspect", "Show a checkpoint's config, sizes, routing and expert load."),
    "export": ("smlp_cli.cmd_export", "export", "Export a checkpoint to ONNX (ort, tensorrt, portable), validate it."),
    "bench": ("smlp_cli.cmd_bench", "bench", "Time a checkpoint or export across backends (table, JSON, PNG, ORT profile)."),
    "generate": ("smlp_cli.cmd_generate", "generate", "Generate text from a checkpoint."),
    "build-engine": ("smlp_cli.cmd_build_engine", "build_engine", "Build a TensorRT engine from a --target tensorrt export."),
    "deploy": ("smlp_cli.cmd_deploy", "deploy", "Write a Triton Inference Server model repository for an export."),
    "validate": ("smlp_cli.cmd_validate", "validate", "Check an export's numbers against PyTorch on held-out text (parity.json)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="smlp-export", prog_name="smlp")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """smlp: export sparse all-MLP language models to verified ONNX / TensorRT engines."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _one_line(message: str) -> str:
    from smlp_export.errors import one_line

    return one_line(message)


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    if not debug:
        import warnings

        # torch.export / torch.onnx emit deprecation chatter about their own internals that users
        # cannot act on; --debug shows it.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        cli.main(args=argv, prog_name="smlp", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # bad option/argument: one line naming it, exit 2 like click
        where = e.ctx.command_path if e.ctx is not None else "smlp"
        click.echo(f"error: {_one_line(e.format_message())} (see '{where} --help')", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into one line
        from smlp_export.errors import SMLPError

        if debug:
            raise
        if isinstance(e, SMLPError):
            click.echo(f"error: {_one_line(str(e))}", err=True)
            sys.exit(1)
        click.echo(f"error: {type(e).__name__}: {_one_line(str(e))} (run with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
