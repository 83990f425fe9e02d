"""The `normdrop` command line: one Typer app; each sub-command lives in a module of this package.

Sub-commands are imported when they run (or when their own ``--help`` is asked for), not up front: ``normdrop
--help`` then costs Typer's import and no more (no torch, pandas, scipy or matplotlib), and so does the start of a
process that re-imports this module (a spawned sweep worker). The listing in ``normdrop --help`` comes from
``COMMANDS`` (a test keeps it equal to each command's own docstring).
"""

from __future__ import annotations

import importlib

import typer
from typer import _click as click
from typer.core import TyperCommand, TyperGroup

COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (module, function or Typer app, the first line of its docstring)
    "sweep": (
        "normdrop.cli.lab",
        "sweep",
        "Run every run of a sweep file that the store does not hold yet; exit status 1 if any run failed.",
    ),
    "runs": (
        "normdrop.cli.lab",
        "runs",
        "List stored runs: their status, the spec fields that differ between them, final metrics and the error of a "
        "failed run; `normdrop runs show RUN_ID` prints one run whole.",
    ),
    "export": (
        "normdrop.cli.lab",
        "export",
        "Export the runs, metrics and probe-record tables of the store, one file each.",
    ),
    "check": (
        "normdrop.cli.lab",
        "check",
        "Run SQLite's full integrity check on the store; if it is damaged, say what and which runs still read (and "
        "export those with `normdrop export`, which reads run by run).",
    ),
    "train": (
        "normdrop.cli.train",
        "train",
        "Train one model from flags and print its final metrics (exit 1 if the run failed, 2 on a bad flag).",
    ),
    "study": (
        "normdrop.cli.study",
        "study",
        "Test every claim in every setting: train the runs the store lacks, analyse them, write the report (HTML, "
        "JSON, Markdown).",
    ),
    "report": (
        "normdrop.cli.study",
        "report",
        "Re-render the report from the runs in the store, without training (the settings and claims recorded in "
        "--out by the last `normdrop study`, unless flags change them).",
    ),
    "bench": (
        "normdrop.cli.bench",
        "bench_app",
        "Time normdrop's BatchNorm and Dropout against torch.nn's, and the study's models with either layers.",
    ),
    "build-fastpath": (
        "normdrop.cli.fastpath",
        "build_fastpath",
        "Build (or find already built) the C++ fast path for small batch-norm and dropout calls.",
    ),
    "ablate": (
        "normdrop.cli.ablate",
        "ablate",
        "Test the claims on your own model and data: arms by surgery, runs into the store, verdicts, a report.",
    ),
    "playground": (
        "normdrop.cli.playground",
        "playground",
        "Watch BN and dropout work, live, in a browser: two to four networks train side by side on 2-D data.",
    ),
}


def load_command(name: str) -> click.Command:
    """Import the module of sub-command ``name`` and build its click command (Typer's, from the function)."""
    module, function, _ = COMMANDS[name]
    callback = getattr(importlib.import_module(module), function)
    if isinstance(callback, typer.Typer):  # a command with sub-commands of its own (``normdrop bench fleet``)
        group = typer.main.get_command(callback)
        group.name = name
        return group
    single = typer.Typer(add_completion=False)
    single.command(name)(callback)
    return typer.main.get_command(single)


class _Placeholder(TyperCommand):
    """Stands for a sub-command in listings until it is resolved (``_LazyGroup.resolve_command``)."""


class _LazyGroup(TyperGroup):
    """A Typer group whose sub-commands are placeholders (name and one-line help) until one is resolved."""

    def __init__(self, **attrs) -> None:
        super().__init__(**attrs)
        for name, (_, _, short_help) in COMMANDS.items():
            self.commands.setdefault(name, _Placeholder(name=name, help=short_help, short_help=short_help))

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and isinstance(self.commands.get(args[0]), _Placeholder):
            self.commands[args[0]] = load_command(args[0])
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="normdrop",
    help="Batch normalization and dropout: layers, a training lab, and tests of the claims made about them.",
    no_args_is_help=True,
    add_completion=False,
    cls=_LazyGroup,
)


@app.callback()
def _main() -> None:
    """Batch normalization and dropout: layers, a training lab, and tests of the claims made about them."""
