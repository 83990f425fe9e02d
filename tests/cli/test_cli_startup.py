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


def _store_holding_every_run(tmp_path: Path, text: str) -> tuple[Path, Path, int]:
    """A sweep file and a store that already holds all its runs (saved as finished, without training)."""
    from normdrop.spec import RunResult
    from normdrop.store import RunProvenance, Store
    from normdrop.sweep import load_sweep_file

    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(text)
    store_path = tmp_path / "runs.db"
    specs = load_sweep_file(sweep_file)
    with Store(store_path) as store:
        for spec in specs:
            result = RunResult(run_id=spec.run_id, spec=spec, status="finished", summary={}, wall_time=0.1)
            store.save(result, RunProvenance.collect(0.0, 0.1))
    return sweep_file, store_path, len({spec.run_id for spec in specs})


@pytest.mark.parametrize(
    "body",
    [
        # every norm kind (both layer sources where they exist), dataset options, a conv model
        'dataset = "blobs"\ndataset_options = {n_train = 40, noise = 0.3}\n\n[grid]\nlr = [0.01, 0.1]\n'
        'norm = ["none", "batch", "renorm", "frozen", "sync"]\n',
        'layers = "torch"\ndropout = 0.3\n\n[grid]\nnorm = ["none", "batch", "sync"]\n'
        'dropout_kind = ["standard", "alpha"]\nactivation = ["relu", "tanh", "selu"]\n',
        # options the catalog vouches for: ghost BN's size, batch renorm's limits and schedule, concrete dropout's
        'norm = "ghost"\nnorm_options = {ghost_batch_size = 8}\ndropout = 0.2\n\n[grid]\n'
        'dropout_kind = ["standard", "alpha", "gaussian", "droppath", "uout"]\n',
        'norm = "renorm"\nnorm_options = {r_max = 2.0, d_max = 1, warmup_steps = 0, r_max_steps = 10}\n'
        'dropout = 0.2\ndropout_kind = "concrete"\ndropout_options = {temperature = 0.2, weight_regularizer = 0.0}\n',
        'model = "cnn2d"\ndataset = "digits"\nnorm = "batch"\ndropout = 0.1\n\n[grid]\n'
        'dropout_kind = ["channel", "feature_alpha"]\n',
        'model = "cnn2d"\ndataset = "digits"\ndropout = 0.1\ndropout_kind = "dropblock"\n'
        "dropout_options = {block_size = 3}\n",
    ],
)
def test_sweep_with_nothing_left_to_run_imports_no_torch(tmp_path, body):
    # Spec validation decides names, dims and options from the torch-free catalogs (normdrop.layer_catalog,
    # normdrop.dataset_catalog), and "already stored?" is a hash of the spec: no torch, no analysis stack.
    text = "seeds = 2\n\n[fixed]\nsteps = 3\n" + body
    sweep_file, store_path, count = _store_holding_every_run(tmp_path, text)
    code, heavy, out = imported_after(["sweep", str(sweep_file), "--store", str(store_path)], cwd=tmp_path)
    assert code == 0, out
    assert f"{count} runs in {sweep_file}: {count} already in the store, 0 finished" in out.replace("\n", " ")
    assert heavy == [], heavy
