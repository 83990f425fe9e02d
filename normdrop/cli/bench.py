"""``normdrop bench``: normdrop's layers against torch.nn's, and the lab's training speed, timed in one process.

The measurements live in :mod:`normdrop.bench` (``layers``: BatchNorm and Dropout against torch.nn with the
memory-bandwidth floor and the bytes kept for backward; ``models``: the study's models, steps per second and
MFU against a matmul peak); this command runs them per thread count with a progress bar on stderr and prints
tables, or one JSON object with ``--json``. Compare ratios within a run, not absolute times across runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer import _click as click

from normdrop.sweep import available_cores

_stdout = Console()
_stderr = Console(stderr=True)


def _progress(quiet: bool) -> Progress:
    """The bar every bench command shows on stderr while it measures (gone when done; none with ``quiet``)."""
    return Progress(
        TextColumn("[progress.description]{task.description:<48}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_stderr,
        disable=quiet,
        transient=True,
    )


Clock = Literal["wall", "cpu"]

DEFAULT_REPEATS = 7
QUICK_REPEATS = 3
QUICK_ROUND_FRACTION = 0.2
"""``--quick`` rounds last this fraction of a normal round."""
PIPED_WIDTH = 130


def _default_threads() -> list[int]:
    """1 and every core this process may use: the lab's runs use one thread each, one run per core."""
    return sorted({1, available_cores()})


def _environment(clock: str, repeats: int, quick: bool) -> dict[str, Any]:
    import numba
    import torch

    from normdrop.nn import kernels
    from normdrop.nn.kernels import fastpath

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "normdrop": importlib.metadata.version("normdrop"),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cores": available_cores(),
        "backend": kernels.requested_backend(),
        # Whether small layers ran through the C++ fast path (built on first use if it was not yet).
        "fastpath": fastpath.enabled() and fastpath.extension() is not None,
        "clock": clock,
        "repeats": repeats,
        "quick": quick,
    }


bench_app = typer.Typer(add_completion=False)
"""``normdrop bench`` (layers and the lab, with no sub-command) and ``normdrop bench fleet``."""


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    quick: Annotated[
        bool,
        typer.Option("--quick", help="Smaller shapes and matmul, fewer and shorter rounds: a smoke run, not numbers."),
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (environment, machine, layers, lab, goals).")
    ] = False,
    threads: Annotated[
        list[int] | None,
        typer.Option(
            "--threads", "-t", min=1, help="A thread count to measure; repeat for several (default: 1 and all cores)."
        ),
    ] = None,
    clock: Annotated[
        Clock, typer.Option(help="wall time, or this process's CPU time (steadier with 1 thread on a busy machine).")
    ] = "wall",
    repeats: Annotated[
        int | None, typer.Option(min=1, help="Timing rounds per case, the best kept (default 7; 3 with --quick).")
    ] = None,
    layers: Annotated[bool, typer.Option("--layers/--no-layers", help="Time BatchNorm and Dropout layers.")] = True,
    lab: Annotated[bool, typer.Option("--lab/--no-lab", help="Time the study's models (steps/s, MFU).")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Time normdrop's BatchNorm and Dropout against torch.nn's, and the study's models with either layers.

    `normdrop bench fleet`: fleet vs solo training speed (`normdrop bench fleet --help`).
    """
    if ctx.invoked_subcommand is not None:
        given = [
            name for name in ctx.params if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise typer.BadParameter(
                f"options of `normdrop bench` itself ({', '.join('--' + n.replace('_', '-') for n in given)}) do "
                f"not apply to `normdrop bench {ctx.invoked_subcommand}`; give it its own options after its name"
            )
        return
    from normdrop.bench import layers as bench_layers  # lazy: keeps `normdrop --help` fast
    from normdrop.bench import models as bench_models
    from normdrop.bench.timing import ROUND_SECONDS

    thread_counts = sorted(set(threads)) if threads else _default_threads()
    repeats = repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS)
    round_seconds = ROUND_SECONDS * (QUICK_ROUND_FRACTION if quick else 1.0)
    matmul_size = bench_models.QUICK_MATMUL_SIZE if quick else bench_models.MATMUL_SIZE
    shapes = bench_layers.QUICK_SHAPES if quick else bench_layers.SHAPES
    layer_cases = bench_layers.cases(shapes, thread_counts) if layers else []
    lab_cases = bench_models.lab_cases(thread_counts) if lab else []

    result: dict[str, Any] = {
        "environment": _environment(clock, repeats, quick),
        "machine": [],
        "layers": [],
        "lab": [],
        "goals": [],
    }
    total = len(layer_cases) + len(lab_cases) + (len(thread_counts) if lab else 0)
    progress = _progress(quiet)
    with progress:
        task = progress.add_task("normdrop bench", total=total)
        for thread_count in thread_counts:
            if lab:
                progress.update(task, description=f"matmul peak {matmul_size}^2, {thread_count} thr")
                result["machine"].append(
                    bench_models.matmul_peak(thread_count, matmul_size, repeats, clock, round_seconds)
                )
                progress.advance(task)
            for case in (c for c in layer_cases if c.threads == thread_count):
                progress.update(task, description=case.label)
                result["layers"].append(bench_layers.measure(case, repeats, clock, round_seconds))
                progress.advance(task)
            peak = next((m for m in result["machine"] if m["threads"] == thread_count), None)
            for case in (c for c in lab_cases if c.threads == thread_count):
                progress.update(task, description=case.label)
                assert peak is not None
                peak_flops = peak["matmul_gflop_per_s"] * 1e9
                result["lab"].append(bench_models.measure(case, peak_flops, repeats, clock, round_seconds))
                progress.advance(task)
    result["goals"] = bench_layers.goals(result["layers"])

    if json_output:
        print(json.dumps(result, indent=2))
        return
    _print_tables(result)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _bytes(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_tables(result: dict[str, Any]) -> None:
    # Piped output is not wrapped at 80 columns: the tables are wide.
    console = _stdout if _stdout.is_terminal else Console(width=PIPED_WIDTH)
    env = result["environment"]
    console.print(
        f"normdrop {env['normdrop']}, torch {env['torch']}, numba {env['numba']}, backend {env['backend']}, "
        f"{env['clock']} clock, best of {env['repeats']} interleaved rounds{' (quick)' if env['quick'] else ''}",
        highlight=False,
    )
    if result["layers"]:
        from normdrop.bench.layers import format_seconds

        table = Table(
            title="Layers: speedup = torch.nn time / normdrop time; % floor = memory-bound floor / time; "
            "kept = bytes per element saved for backward",
            title_justify="left",
            box=box.SIMPLE_HEAD,
        )
        for column in ("shape", "thr", "op", "normdrop", "torch.nn", "speedup", "% floor nd", "% floor torch"):
            table.add_column(column, justify="left" if column in ("shape", "op") else "right")
        table.add_column("kept nd", justify="right")
        table.add_column("kept torch", justify="right")
        for row in result["layers"]:
            table.add_row(
                f"{row['shape_name']} {'x'.join(map(str, row['shape']))}",
                str(row["threads"]),
                row["op"],
                format_seconds(row["normdrop_seconds"]),
                format_seconds(row["torch_seconds"]),
                f"{row['speedup']:.2f}x",
                _percent(row["normdrop_floor_percent"]),
                _percent(row["torch_floor_percent"]),
                _bytes(row["normdrop_saved_bytes_per_element"]),
                _bytes(row["torch_saved_bytes_per_element"]),
            )
        console.print(table)
        for thread_count in sorted({row["threads"] for row in result["layers"]}):
            rows = [row for row in result["layers"] if row["threads"] == thread_count]
            largest = max(rows, key=lambda row: math.prod(row["shape"]))
            console.print(
                f"copy bandwidth ({largest['shape_name']}, {thread_count} thr): {largest['copy_gb_per_s']:.1f} GB/s",
                highlight=False,
            )
    for peak in result["machine"]:
        console.print(
            f"matmul peak ({peak['matmul_size']}^2 float32, {peak['threads']} thr): "
            f"{peak['matmul_gflop_per_s']:.1f} GFLOP/s",
            highlight=False,
        )
    if result["lab"]:
        table = Table(
            title="The lab: training steps per second, normdrop vs torch.nn layers",
            title_justify="left",
            box=box.SIMPLE_HEAD,
        )
        for column in ("model", "thr", "normdrop steps/s", "torch.nn steps/s", "speedup", "MFU nd", "MFU torch"):
            table.add_column(column, justify="left" if column == "model" else "right")
        for row in result["lab"]:
            table.add_row(
                f"{row['model']} ({row['description']})",
                str(row["threads"]),
                f"{row['normdrop_steps_per_s']:.0f}",
                f"{row['torch_steps_per_s']:.0f}",
                f"{row['speedup']:.2f}x",
                f"{row['normdrop_mfu_percent']:.2f}%",
                f"{row['torch_mfu_percent']:.2f}%",
            )
        console.print(table)
    if result["goals"]:
        table = Table(title="The speed goals", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("goal", "thr", "measured", "target", "met"):
            table.add_column(column, justify="left" if column == "goal" else "right")
        for goal in result["goals"]:
            table.add_row(
                f"{goal['goal']} ({goal['op']}, {goal['shape_name']})",
                str(goal["threads"]),
                f"{goal['measured']:.3g}",
                f"{goal['bound']} {goal['target']:g}",
                "yes" if goal["met"] else "no",
            )
        console.print(table)


@bench_app.command("fleet")
def fleet(
    members: Annotated[
        list[int] | None,
        typer.Option("--members", "-k", min=1, help="A fleet size K; repeat for several (default: 10 and 40)."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Training steps per run (default 100; 10 with --quick).")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(min=1, help="Alternating fleet/solo rounds, the best kept (default 3; 1 quick).")
    ] = None,
    families: Annotated[
        list[str] | None,
        typer.Option(
            "--family",
            "-f",
            help="A family to measure, by its name in the table (e.g. 'small 2x128 adam bn+dropout'); repeat for "
            "several (default: all four).",
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Few steps, one round, a small matmul: a smoke run, not numbers.")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object (machine, load, rows).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Fleet vs solo training speed (member-steps/s, 1 thread) of the study's MLP families, beside a matmul peak."""
    import os

    from normdrop.bench import fleet as bench_fleet
    from normdrop.bench import models as bench_models

    names = families or list(bench_fleet.FLEET_FAMILIES)
    unknown = [name for name in names if name not in bench_fleet.FLEET_FAMILIES]
    if unknown:
        raise typer.BadParameter(
            f"unknown family {unknown[0]!r}; expected one of {', '.join(map(repr, bench_fleet.FLEET_FAMILIES))}",
            param_hint="--family",
        )
    sizes = sorted(set(members)) if members else list(bench_fleet.DEFAULT_MEMBERS)
    steps = steps or (bench_fleet.QUICK_STEPS if quick else bench_fleet.DEFAULT_STEPS)
    repeats = repeats or (bench_fleet.QUICK_REPEATS if quick else bench_fleet.DEFAULT_REPEATS)
    matmul_size = bench_models.QUICK_MATMUL_SIZE if quick else bench_models.MATMUL_SIZE
    result: dict[str, Any] = {"environment": _environment("wall", repeats, quick), "rows": []}
    progress = _progress(quiet)
    with progress:
        task = progress.add_task("normdrop bench fleet", total=1 + len(names) * len(sizes))
        progress.update(task, description=f"matmul peak {matmul_size}^2, 1 thr")
        result["machine"] = bench_models.matmul_peak(1, matmul_size, 3 if quick else DEFAULT_REPEATS)
        progress.advance(task)
        for name in names:
            for size in sizes:
                progress.update(task, description=f"{name}, K={size}")
                peak = result["machine"]["matmul_gflop_per_s"]
                result["rows"].append(bench_fleet.measure(name, size, steps, repeats, peak))
                progress.advance(task)
    result["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if json_output:
        print(json.dumps(result, indent=2))
        return
    console = _stdout if _stdout.is_terminal else Console(width=PIPED_WIDTH)
    peak = result["machine"]
    console.print(
        f"1 thread; matmul peak {peak['matmul_gflop_per_s']:.1f} GFLOP/s ({peak['matmul_size']}^2 float32); "
        f"load average {result['load_average']}; best of {repeats} alternating rounds, {steps} steps",
        highlight=False,
    )
    table = Table(
        title="Fleet vs solo: member-steps/s; speedup = fleet / solo; GFLOP/s (% of the matmul peak)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for column in ("family", "K", "fleet m-steps/s", "solo m-steps/s", "speedup", "fleet GFLOP/s", "solo GFLOP/s"):
        table.add_column(column, justify="left" if column == "family" else "right")
    for row in result["rows"]:
        table.add_row(
            row["family"],
            str(row["members"]),
            f"{row['fleet_member_steps_per_s']:.1f}",
            f"{row['solo_member_steps_per_s']:.1f}",
            f"{row['speedup']:.2f}x",
            f"{row['fleet_gflop_per_s']:.1f} ({_percent(row['fleet_percent_of_peak'])})",
            f"{row['solo_gflop_per_s']:.1f} ({_percent(row['solo_percent_of_peak'])})",
        )
    console.print(table)
