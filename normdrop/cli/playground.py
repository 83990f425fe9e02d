"""``normdrop playground``: start the live web app that trains networks with BN and dropout side by side."""

from __future__ import annotations

import typer

from normdrop.playground import DEFAULT_HOST, DEFAULT_PORT  # no web dependency: every command imports this


def playground(
    port: int = typer.Option(DEFAULT_PORT, "--port", min=0, max=65535, help="port to listen on (0: any free port)"),
    host: str = typer.Option(
        DEFAULT_HOST, "--host", help="address to bind; anything but loopback lets other machines reach it (warned)"
    ),
    no_open: bool = typer.Option(False, "--no-open", help="print the URL but do not open a browser"),
) -> None:
    """Watch BN and dropout work, live, in a browser: two to four networks train side by side on 2-D data.

    Prints the URL (it carries a per-launch token; only pages opened from it can drive the server) and serves until
    Ctrl-C.
    """
    try:
        from normdrop.playground.server import serve  # the web stack is an optional extra: imported only here
    except ImportError as error:
        typer.echo(f"error: normdrop playground needs {error.name}: pip install 'normdrop[playground]'", err=True)
        raise typer.Exit(1) from None
    try:
        serve(host=host, port=port, open_browser=not no_open, echo=typer.echo)
    except OSError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
