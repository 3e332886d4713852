"""Option groups shared by several commands (defined once, stacked by each command)."""
from __future__ import annotations

import click

checkpoint_argument = click.argument("checkpoint", required=False, default=None, metavar="[CKPT]")
allow_pickle_option = click.option("--allow-pickle", is_flag=True,
                                   help="Allow a pickled .pt checkpoint (loaded with weights_only=True).")
json_flag = click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of a table.")
force_option = click.option("--force", is_flag=True,
                            help="Replace the output if it exists (only an empty folder or a checkpoint, export or "
                                 "model repository smlp wrote; never the command's input).")
quiet_option = click.option("-q", "--quiet", is_flag=True,
                            help="No progress on stderr (it is shown only when stderr is a terminal).")


def _option_name(param: click.Parameter | None) -> str:
    return max(param.opts, key=len) if param is not None and param.opts else "value"


class FiniteFloat(click.ParamType):
    """A float option that refuses nan and +-inf (nan passes every range comparison; inf makes a
    loop run forever) and values below ``min``. A bad value is an ``InputError``: one line, exit 1,
    raised while the options are parsed, so before a command writes anything."""

    name = "float"

    def __init__(self, min: float | None = None, min_open: bool = False) -> None:
        self.min, self.min_open = min, min_open

    def convert(self, value, param, ctx):
        import math

        from smlp_export.errors import InputError

        v = click.FLOAT.convert(value, param, ctx)
        name = _option_name(param)
        if not math.isfinite(v):
            raise InputError(f"{name} must be a finite number, got {value!r}")
        if self.min is not None and (v < self.min or (self.min_open and v == self.min)):
            raise InputError(f"{name} must be {'>' if self.min_open else '>='} {self.min:g}, got {value!r}")
        return v


class SeedType(click.ParamType):
    """A seed both numpy (>= 0) and torch (< 2**64) accept; checked before any output."""

    name = "integer"
    MAX = 2**32 - 1

    def convert(self, value, param, ctx):
        from smlp_export.errors import InputError

        v = click.INT.convert(value, param, ctx)
        if not 0 <= v <= self.MAX:
            raise InputError(f"{_option_name(param)} must be in [0, {self.MAX}], got {value!r}")
        return v


seed_option = click.option("--seed", type=SeedType(), default=0, show_default=True, help="Random seed.")


def elsewhere_option(name: str, instead: str):
    """A hidden option for a flag users bring from another tool (trtexec, perf_analyzer, Polygraphy)
    that this command has no equivalent for: given, it is refused with one line saying what to use."""
    def refuse(ctx, param, value):
        if value is not None:
            from smlp_export.errors import InputError

            raise InputError(f"{name} is not an option of `{ctx.command_path}`: {instead}")
        return value

    return click.option(name, default=None, hidden=True, expose_value=False, callback=refuse, metavar="X")


# ONNX Runtime provider names as Polygraphy's --providers accepts them (short, case-insensitive)
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "rocm": "ROCMExecutionProvider", "openvino": "OpenVINOExecutionProvider",
                    "dml": "DmlExecutionProvider", "coreml": "CoreMLExecutionProvider"}


def parse_providers(ctx, param, value) -> tuple[str, ...]:
    """--providers (Polygraphy's spelling): comma- or space-separated names, each an ONNX Runtime
    provider or a short form (cpu, cuda, tensorrt, ...)."""
    if not value:
        return ()
    out = []
    for v in value:
        for name in v.replace(",", " ").split():
            out.append(PROVIDER_ALIASES.get(name.lower(), name))
    return tuple(out)


def with_checkpoint(f):
    """[CKPT] argument (default: the embedded default model) + --allow-pickle."""
    return checkpoint_argument(allow_pickle_option(f))
