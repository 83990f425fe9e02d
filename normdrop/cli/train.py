"""``normdrop train``: one run from command-line flags, one flag per :class:`~normdrop.spec.RunSpec` field.

The flags are generated from the spec's fields (``lr_step_size`` -> ``--lr-step-size``), so a new field is a new
flag with no change here. Values go to the spec as text and pydantic converts and checks them; a flag left out keeps
the spec's default. Booleans are switches (``--nesterov`` / ``--no-nesterov``); tuple fields take a comma-separated
list (``--probes a,b``, ``--dataset-options noise=0.5,n_train=200``); ``none`` means None where a field allows it.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any, NoReturn

import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.table import Table

from normdrop.cli.errors import fail, one_line_errors
from normdrop.spec import RunResult, RunSpec

_stdout = Console()
_stderr = Console(stderr=True)

# Options of the command itself, next to the generated spec flags.
_COMMAND_OPTIONS = {
    "json_output": (bool, typer.Option(False, "--json", help="Print one JSON object with the final metrics.")),
    "quiet": (bool, typer.Option(False, "--quiet", "-q", help="No progress bar and no summary table.")),
    "data_root": (
        Path | None,
        typer.Option(None, help="Directory of real dataset files (mnist, fashion-mnist, cifar10)."),
    ),
    "threads": (int, typer.Option(1, min=1, help="torch threads for the run (results depend on it bitwise).")),
    "store": (
        Path | None,
        typer.Option(None, "--store", help="Save the run into this run store (listed later by `normdrop runs`)."),
    ),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _allows_none(field: FieldInfo) -> bool:
    return type(None) in typing.get_args(field.annotation)


def _metavar(field: FieldInfo) -> str:
    """What a flag takes: its choices for a Literal field, else the type's name."""
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(typing.get_args(annotation))
    if typing.get_origin(annotation) is tuple:
        return "KEY=VALUE,..." if typing.get_args(annotation)[0] is not str else "NAME,..."
    kinds = [kind for kind in (int, float, str) if kind is annotation or kind in typing.get_args(annotation)]
    return kinds[0].__name__.upper() if kinds else "VALUE"


def _help(field: FieldInfo) -> str:
    default = field.default
    shown = ",".join(str(item) for item in default) if isinstance(default, tuple) else str(default)
    return f"{field.description} (default: {shown or 'empty'})"


def _spec_parameters() -> list[inspect.Parameter]:
    """One keyword parameter, defaulting to "not given" (None), per RunSpec field."""
    parameters = []
    for name, field in RunSpec.model_fields.items():
        if field.annotation is bool:
            option = typer.Option(
                None,
                f"{_flag(name)}/--no-{_flag(name)[2:]}",
                help=_help(field),
                show_default=False,
            )
            annotation: Any = bool | None
        else:
            option = typer.Option(None, _flag(name), help=_help(field), show_default=False, metavar=_metavar(field))
            annotation = str | None
        parameters.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
        )
    return parameters


def _parse_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _spec_value(name: str, text: str) -> Any:
    """Turn a flag's text into what RunSpec accepts (tuples from comma lists, None from 'none')."""
    field = RunSpec.model_fields[name]
    if typing.get_origin(field.annotation) is tuple:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if typing.get_args(field.annotation)[0] is str:  # a tuple of names (probes)
            return tuple(items)
        pairs = []
        for item in items:
            key, separator, value = item.partition("=")
            if not separator or not key.strip():
                raise ValueError(f"expected KEY=VALUE, got {item!r}")
            pairs.append((key.strip(), _parse_number(value.strip())))
        return tuple(pairs)
    if _allows_none(field) and text.strip().lower() == "none":
        return None
    return text


def _fail(message: str, code: int) -> NoReturn:
    fail(message, code)


def _spec_from_flags(given: dict[str, Any]) -> RunSpec:
    values = {}
    for name, text in given.items():
        if text is None:
            continue
        try:
            values[name] = text if isinstance(text, bool) else _spec_value(name, text)
        except ValueError as error:
            _fail(f"{_flag(name)} {text!r}: {error}", code=2)
    try:
        return RunSpec(**values)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            location = problem["loc"]
            if location:
                name = str(location[0])
                lines.append(f"{_flag(name)}={given.get(name)!r}: {problem['msg']}")
            else:
                lines.append(problem["msg"])
        _fail("invalid run spec: " + "; ".join(lines), code=2)


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _result_object(result: RunResult) -> dict[str, Any]:
    summary = {name: _json_safe(value) for name, value in result.summary.items()}
    return {
        "run_id": result.run_id,
        "status": result.status,
        "diverged_step": result.diverged_step,
        "error": result.error,
        "wall_time": result.wall_time,
        **summary,
        "spec": result.spec.model_dump(mode="json"),
    }


def _print_table(result: RunResult) -> None:
    table = Table(title=f"run {result.run_id}: {result.status}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.summary.items():
        table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value))
    if result.diverged_step is not None:
        table.add_row("diverged_step", str(result.diverged_step))
    table.add_row("wall_time (s)", f"{result.wall_time:.1f}")
    _stdout.print(table)


def train(**options: Any) -> None:
    """Train one model from flags and print its final metrics (exit 1 if the run failed, 2 on a bad flag).
    With --store the run is saved there (a run already stored as finished or diverged is kept)."""
    import time

    from normdrop.lab import run_spec  # lazy: keeps `normdrop --help` fast
    from normdrop.store import RunProvenance, Store

    json_output, quiet = options.pop("json_output"), options.pop("quiet")
    data_root, threads = options.pop("data_root"), options.pop("threads")
    store_path = options.pop("store")
    spec = _spec_from_flags(options)
    if data_root is not None and not data_root.is_dir():
        _fail(f"--data-root {data_root}: not a directory", code=2)
    # Open (and check) the store before training: a bad, damaged or read-only store fails now, not after the run.
    store = Store(store_path) if store_path is not None else None
    show_progress = not (quiet or json_output) and sys.stderr.isatty()
    try:
        started, cpu_started = time.time(), time.process_time()
        result = run_spec(spec, progress=show_progress, data_root=data_root, num_threads=threads)
        if store is not None:
            store.save(result, RunProvenance.collect(started, time.time(), time.process_time() - cpu_started))
    finally:
        if store is not None:
            store.close()
    if json_output:
        print(json.dumps(_result_object(result), allow_nan=False))
    elif not quiet:
        _print_table(result)
    if result.status == "failed":
        last_line = [line for line in (result.error or "").splitlines() if line.strip()][-1:]
        _fail(f"run {result.run_id} failed: {''.join(last_line)}", code=1)


train.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        *_spec_parameters(),
        *(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
            for name, (annotation, option) in _COMMAND_OPTIONS.items()
        ),
    ]
)
train.__annotations__ = {parameter.name: parameter.annotation for parameter in train.__signature__.parameters.values()}
train = one_line_errors(train)
