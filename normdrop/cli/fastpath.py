"""``normdrop build-fastpath``: compile the C++ fast path for small layers now rather than at the first layer call."""

from __future__ import annotations

import time

import typer
from rich.console import Console

_stderr = Console(stderr=True)


def build_fastpath() -> None:
    """Build (or find already built) the C++ fast path for small batch-norm and dropout calls.

    The first build takes about 30 s and needs a C++ compiler; later calls only check it is up to date. Exits with
    status 1 if it cannot be built (normdrop then runs small layers through Python: slower, equal only to rounding).
    """
    from normdrop.nn.kernels import fastpath

    start = time.perf_counter()
    with _stderr.status("building normdrop's C++ fast path (about 30 s the first time)..."):
        module = fastpath.extension()
    if module is None:
        _stderr.print("[red]the fast path is NOT available[/red]: see the warning above for why")
        raise typer.Exit(1)
    _stderr.print(f"fast path ready in {fastpath.build_dir()} ({time.perf_counter() - start:.1f} s)")
