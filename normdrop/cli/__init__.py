"""The `normdrop` command line: one Typer app; each sub-command lives in a module of this package."""

import typer

app = typer.Typer(
    name="normdrop",
    help="Batch normalization and dropout: layers, a training lab, and tests of the claims made about them.",
    no_args_is_help=True,
    add_completion=False,
)

# Sub-commands register themselves here, one line each: app.command()(module.function)

from normdrop.cli import lab  # noqa: E402

app.command()(lab.sweep)
app.command()(lab.runs)
app.command()(lab.export)
app.command()(lab.check)

from normdrop.cli import train  # noqa: E402

app.command()(train.train)

from normdrop.cli import study  # noqa: E402

app.command()(study.study)
app.command()(study.report)

from normdrop.cli import bench  # noqa: E402

app.command()(bench.bench)

from normdrop.cli import fastpath  # noqa: E402

app.command()(fastpath.build_fastpath)
