"""``normdrop ablate MODEL --data DATA``: the claims, tested on the user's own model and data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from normdrop.store import DEFAULT_STORE_FILENAME, STORE_ENV_VAR

_stdout = Console()
_stderr = Console(stderr=True)


def _load_data(reference: str):
    """A ``.npz`` file with X_train, y_train, X_test, y_test, or ``module:function`` returning any form
    :func:`normdrop.ablate` takes."""
    import numpy as np

    from normdrop.ablation.inputs import UserInputError, load_object

    if reference.endswith(".npz"):
        path = Path(reference)
        if not path.is_file():
            raise UserInputError(f"--data {reference!r}: no such file")
        try:
            return dict(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as error:
            raise UserInputError(f"--data {reference!r}: not a readable .npz file ({error})") from None
    function = load_object(reference, "--data")
    if not callable(function):
        raise UserInputError(f"--data {reference!r}: {type(function).__name__} is not callable")
    return function()


def ablate(
    model: Annotated[str, typer.Argument(help="The model builder: path/to/model.py:build or module:build.")],
    data: Annotated[
        str, typer.Option("--data", help="data.npz (X_train, y_train, X_test, y_test) or module:function.")
    ],
    claims: Annotated[
        str | None, typer.Option(help="Comma-separated claim ids (default: every claim ablate supports).")
    ] = None,
    seeds: Annotated[int, typer.Option(min=2, help="Seeds per arm.")] = 3,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps per run.")] = 300,
    lr: Annotated[float, typer.Option(help="Learning rate (> 0).")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="sgd, adam or adamw.")] = "adam",
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step (arrays only).")] = 64,
    momentum: Annotated[float, typer.Option(min=0.0, help="SGD momentum.")] = 0.0,
    out: Annotated[Path, typer.Option(help="Directory of report.html and summary.json.")] = Path("normdrop-ablate"),
    store: Annotated[
        Path, typer.Option("--store", envvar=STORE_ENV_VAR, show_envvar=True, help="The run store (SQLite file).")
    ] = Path(DEFAULT_STORE_FILENAME),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Test the claims on your own model and data: arms by surgery, runs into the store, verdicts, a report."""
    from pydantic import ValidationError

    from normdrop.ablation import UserInputError
    from normdrop.ablation import ablate as run_ablation
    from normdrop.ablation.inputs import load_object

    if optimizer not in ("sgd", "adam", "adamw"):
        _fail(f"--optimizer {optimizer!r}: expected sgd, adam or adamw")
    try:
        model_fn = load_object(model, "MODEL")
        if not callable(model_fn):
            raise UserInputError(f"MODEL {model!r}: {type(model_fn).__name__} is not callable")
        outcome = run_ablation(
            model_fn,
            _load_data(data),
            claims=None if claims is None else [c.strip() for c in claims.split(",") if c.strip()],
            seeds=seeds,
            steps=steps,
            optimizer=optimizer,
            lr=lr,
            batch_size=batch_size,
            momentum=momentum,
            out=out,
            store=store,
            model_name=model,
            progress=not quiet,
        )
    except UserInputError as error:
        _fail(str(error))
    except ValidationError as error:
        first = error.errors()[0]
        _fail(f"{'.'.join(map(str, first['loc']))}: {first['msg']}")
    for claim in outcome.claims:
        detail = claim.reason if claim.analysis is None else claim.analysis.primary.decision.reason
        _stdout.print(f"{claim.id:<22} {claim.verdict:<16} {detail}", highlight=False, soft_wrap=True)
    _stdout.print(f"report: {out / 'report.html'}  runs: {outcome.runs}  ({outcome.wall_seconds:.0f} s)")


def _fail(message: str) -> None:
    _stderr.print(f"normdrop ablate: {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)
