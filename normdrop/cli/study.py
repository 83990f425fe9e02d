"""``normdrop study`` tests every claim of docs/claims.md and writes the report; ``normdrop report`` re-renders it
from the store without training."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table as RichTable
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


ClaimsOption = Annotated[
    str | None,
    typer.Option("--claims", help="Claim ids to test, comma-separated (default: every claim).", show_default=False),
]
SettingsOption = Annotated[
    str | None,
    typer.Option(
        "--settings",
        help="Settings to run, comma-separated (default: every setting; see --list-settings).",
        show_default=False,
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Architecture for every run of every setting (mlp, cnn1d, cnn2d, resnet), replacing the settings' own.",
        show_default=False,
    ),
]
DatasetOption = Annotated[
    str | None,
    typer.Option(help="Dataset for every setting, replacing each setting's own.", show_default=False),
]


def _check_dataset(dataset: str | None) -> str | None:
    from normdrop.data import DATASET_NAMES

    if dataset is not None and dataset not in DATASET_NAMES:
        _fail(f"--dataset: unknown dataset {dataset!r}; expected one of {', '.join(DATASET_NAMES)}")
    return dataset


def _check_model(model: str | None) -> dict[str, str]:
    import typing

    from normdrop.spec import ModelName

    names = typing.get_args(ModelName)
    if model is not None and model not in names:
        _fail(f"--model: unknown model {model!r}; expected one of {', '.join(names)}")
    return {} if model is None else {"model": model}


def _names(text: str | None, valid: list[str], what: str, flag: str) -> list[str] | None:
    """The comma-separated names of ``text`` (None: all), each checked against ``valid``."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        shown = ", ".join(unknown) if unknown else repr(text)
        _fail(f"{flag}: unknown {what} {shown}; expected names from {', '.join(valid)}")
    return list(dict.fromkeys(names))


def _choose(
    claims: str | None,
    settings: str | None,
    *,
    quick: bool,
    seeds: int | None,
    dataset: str | None,
    model: str | None,
) -> tuple[list, list]:
    """The claims and settings a study runs, every name and override checked before any work."""
    from normdrop.claims import all_claims
    from normdrop.claims.setting import SETTINGS
    from normdrop.study import default_settings

    registered = {claim.id: claim for claim in all_claims()}
    claim_ids = _names(claims, list(registered), "claim(s)", "--claims")
    setting_names = _names(settings, list(SETTINGS), "setting(s)", "--settings")
    overrides = _check_model(model)
    chosen_claims = list(registered.values()) if claim_ids is None else [registered[i] for i in claim_ids]
    if claim_ids is not None and "summary" in claim_ids:
        chosen_claims = [c for c in chosen_claims if c.id != "summary"] + [registered["summary"]]
    if setting_names is None:  # every setting that applies to one of the chosen claims (quick: its one setting)
        from normdrop.study import QUICK_SETTINGS

        pool = QUICK_SETTINGS if quick else tuple(SETTINGS)
        setting_names = [name for name in pool if any(SETTINGS[name].applies_to(c.id) for c in chosen_claims)]
        if not setting_names:
            setting_names = [name for name, d in SETTINGS.items() if any(d.applies_to(c.id) for c in chosen_claims)]
    chosen_settings = default_settings(
        setting_names, quick=quick, seeds=seeds, dataset=_check_dataset(dataset), overrides=overrides
    )
    for claim in chosen_claims:
        if not any(s.applies_to(claim.id) for s in chosen_settings):
            where = [name for name, d in SETTINGS.items() if d.applies_to(claim.id)]
            _fail(
                f"--settings: claim {claim.id!r} runs in none of {', '.join(setting_names)}; "
                f"it runs in {', '.join(where)}"
            )
    return chosen_claims, chosen_settings


def _list_settings() -> None:
    from normdrop.claims import CLAIM_IDS
    from normdrop.claims.setting import SETTINGS

    table = RichTable(title="normdrop study settings")
    for column in ("name", "title", "dataset", "claims"):
        table.add_column(column, overflow="fold")
    for name, d in SETTINGS.items():
        claims = "all" if d.claims is None else ", ".join(i for i in CLAIM_IDS if d.applies_to(i))
        table.add_row(name, d.title, d.dataset, claims)
    _stdout.print(table)


@one_line_errors
def study(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="One setting (mlp-sgd), short runs, thinned grids, 3 seeds: a first look, not for citing."
        ),
    ] = False,
    claims: ClaimsOption = None,
    settings: SettingsOption = None,
    list_settings: Annotated[
        bool, typer.Option("--list-settings", help="Print the settings (name, title, dataset, claims) and exit.")
    ] = False,
    model: ModelOption = None,
    dataset: DatasetOption = None,
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
    """Test every claim in every setting: train the runs the store lacks, analyse them, write the report (HTML, JSON,
    Markdown)."""
    if list_settings:
        _list_settings()
        return
    from normdrop.study import MixedNumericPaths, run_study

    chosen_claims, chosen_settings = _choose(claims, settings, quick=quick, seeds=seeds, dataset=dataset, model=model)
    check_out_dir(out, "--out")
    try:
        outcome = run_study(
            chosen_settings,
            store,
            claims=chosen_claims,
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
    claims: ClaimsOption = None,
    settings: SettingsOption = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset of the study (default: as recorded in --out).", show_default=False)
    ] = None,
    seeds: SeedsOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars and no table.")] = False,
) -> None:
    """Re-render the report from the runs in the store, without training (the settings and claims recorded in --out
    by the last `normdrop study`, unless flags change them)."""
    from normdrop.claims import all_claims
    from normdrop.claims.setting import SETTINGS, StudySetting
    from normdrop.report import read_study
    from normdrop.study import run_study

    if not store.exists():
        _fail(f"{store}: no run store here (run `normdrop study` first, or pass --store / ${STORE_ENV_VAR})")
    check_out_dir(out, "--out")
    registered = {claim.id: claim for claim in all_claims()}
    claim_ids = _names(claims, list(registered), "claim(s)", "--claims")
    setting_names = _names(settings, list(SETTINGS), "setting(s)", "--settings")
    _check_dataset(dataset)  # every flag checked before anything is printed: a bad one gives one line
    recorded = read_study(out)
    if recorded is None and not quiet:
        _stderr.print(f"note: no study recorded in {out}; reporting the default study unless flags say otherwise")
    if claim_ids is None and recorded is not None and recorded["claims"]:
        unknown = [i for i in recorded["claims"] if i not in registered]
        claim_ids = [i for i in recorded["claims"] if i in registered]
        if not claim_ids:
            _fail(f"{out}: the recorded claims {', '.join(unknown)} are not registered; pass --claims")
        if unknown and not quiet:
            _stderr.print(f"note: recorded claims not registered, left out: {', '.join(unknown)}")
    dicts = recorded["settings"] if recorded is not None else [{"name": name} for name in SETTINGS]
    if setting_names is not None:
        by_name = {d.get("name"): d for d in dicts}
        dicts = [by_name.get(name, {"name": name}) for name in setting_names]
    _check_dataset(dataset)
    chosen = []
    for d in dicts:
        d = dict(d)
        if quick is not None and quick != d.get("quick", False):
            d.update(quick=quick, seeds=None, selection_seeds=None)
        if dataset is not None:
            d["dataset"] = dataset
        if seeds is not None:
            d["seeds"] = seeds
        chosen.append(StudySetting.from_dict(d))
    chosen_claims = list(registered.values()) if claim_ids is None else [registered[i] for i in claim_ids]
    chosen_claims = [c for c in chosen_claims if c.id != "summary"] + [c for c in chosen_claims if c.id == "summary"]
    try:
        outcome = run_study(chosen, store, claims=chosen_claims, train=False, progress=not quiet)
    except (StoreError, ValueError) as error:
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
