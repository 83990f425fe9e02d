"""``normdrop study`` tests every claim of docs/claims.md and writes the report; ``normdrop report`` re-renders it
from the store without training."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from normdrop.cli.errors import fail, one_line_errors
from normdrop.cli.lab import check_out_dir
from normdrop.store import DEFAULT_STORE_FILENAME, STORE_ENV_VAR, StoreError
from normdrop.sweep import ExecutorName

if TYPE_CHECKING:  # the study's modules (claims, torch, scipy) are imported when a command runs, not for --help
    from normdrop.study import StudyOutcome

DEFAULT_OUT_DIR = Path("normdrop-report")
"""``normdrop.study.DEFAULT_OUT_DIR``, repeated so --help needs no import of the study (a test keeps them equal)."""

_stdout = Console()
_stderr = Console(stderr=True)

StoreOption = Annotated[
    Path,
    typer.Option("--store", envvar=STORE_ENV_VAR, show_envvar=True, help="The run store (a SQLite file)."),
]
OutOption = Annotated[Path, typer.Option("--out", help="Directory of the report (report.html, summary.json/.md).")]
SeedsOption = Annotated[
    int | None, typer.Option(min=1, help="Seeds per arm (default 5; 3 with --quick).", show_default=False)
]


def _check_dataset(dataset: str) -> str:
    from normdrop.data import DATASET_NAMES

    if dataset not in DATASET_NAMES:
        raise typer.BadParameter(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASET_NAMES)}")
    return dataset


@one_line_errors
def study(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Short runs and thinned grids (19 s on 2 idle cores, measured; longer on a busy machine)."
        ),
    ] = False,
    dataset: Annotated[str, typer.Option(help="Dataset every claim trains on.")] = "mnist1d",
    seeds: SeedsOption = None,
    out: OutOption = DEFAULT_OUT_DIR,
    executor: Annotated[ExecutorName, typer.Option(help="Where runs execute.")] = "local",
    store: StoreOption = Path(DEFAULT_STORE_FILENAME),
    workers: Annotated[
        int | None, typer.Option(min=1, help="Parallel runs of the local executor (default: one per core).")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (default $RAY_ADDRESS, else a local instance).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars and no table.")] = False,
    fleet: Annotated[
        bool, typer.Option("--fleet/--no-fleet", help="Train MLP runs that share a shape as batched fleets.")
    ] = True,
    strict_numeric_path: Annotated[
        bool,
        typer.Option(
            "--strict-numeric-path",
            help="Refuse to analyse runs computed on different numeric paths (backend, fast path); default: a note.",
        ),
    ] = False,
) -> None:
    """Test every claim: train the runs the store lacks, analyse them, write the report (HTML, JSON, Markdown)."""
    from normdrop.claims.setting import StudySetting
    from normdrop.study import MixedNumericPaths, run_study

    setting = StudySetting.create(quick=quick, dataset=_check_dataset(dataset), seeds=seeds)
    check_out_dir(out, "--out")
    try:
        outcome = run_study(
            setting,
            store,
            executor=executor,
            workers=workers,
            ray_address=ray_address,
            progress=not quiet,
            fleet=fleet,
            strict_numeric_path=strict_numeric_path,
        )
    except (StoreError, ImportError, MixedNumericPaths) as error:
        _fail(str(error))
    _finish(outcome, out, quiet)


@one_line_errors
def report(
    out: OutOption = DEFAULT_OUT_DIR,
    store: StoreOption = Path(DEFAULT_STORE_FILENAME),
    quick: Annotated[
        bool | None,
        typer.Option(
            "--quick/--full", help="Which study to report (default: the one recorded in --out).", show_default=False
        ),
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset of the study (default: as recorded in --out).", show_default=False)
    ] = None,
    seeds: SeedsOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars and no table.")] = False,
) -> None:
    """Re-render the report from the runs in the store, without training (the setting recorded in --out by the last
    `normdrop study`, unless flags change it)."""
    from normdrop.claims.setting import StudySetting
    from normdrop.report import read_setting
    from normdrop.study import run_study

    if not store.exists():
        _fail(f"{store}: no run store here (run `normdrop study` first, or pass --store / ${STORE_ENV_VAR})")
    check_out_dir(out, "--out")
    recorded = read_setting(out) or {}
    if not recorded and not quiet:
        _stderr.print(f"note: no study recorded in {out}; reporting the default study unless flags say otherwise")
    if quick is not None and quick != recorded.get("quick", False):
        recorded = {**recorded, "quick": quick, "seeds": None}
    if dataset is not None:
        recorded["dataset"] = _check_dataset(dataset)
    if seeds is not None:
        recorded["seeds"] = seeds
    setting = StudySetting.from_dict(recorded)
    try:
        outcome = run_study(setting, store, train=False, progress=not quiet)
    except StoreError as error:
        _fail(str(error))
    _finish(outcome, out, quiet)


def _finish(outcome: StudyOutcome, out: Path, quiet: bool) -> None:
    from normdrop.report import terminal_table, write_report

    paths = write_report(outcome, out)
    if not quiet:
        _stdout.print(terminal_table(outcome))
        for note in outcome.notes:
            _stderr.print(Text(f"note: {note}", style="yellow"), soft_wrap=True)
    _stdout.print(f"report: {paths['html']}  ({paths['json'].name}, {paths['markdown'].name})", markup=False)


def _fail(message: str) -> NoReturn:
    fail(message)
