"""What ``normdrop train`` and ``normdrop sweep`` show while they run: the phases of a run's first seconds, and a
last frame at N/N, read from what rich actually drew (a terminal console of fixed width writing to a buffer)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import rich.console
from test_sweep import fake_run

import normdrop.sweep as sweep_module
import normdrop.train as train_module
from normdrop.spec import RunSpec
from normdrop.store import RunProvenance, Store

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_COUNT = re.compile(r"\b(\d+)/(\d+)\b")
_RealConsole = rich.console.Console


def terminal_into(buffer: io.StringIO):
    """A Console factory drawing, as on a 100-column terminal, into ``buffer`` (the frames as a user sees them)."""

    def console(*_args, **_kwargs) -> rich.console.Console:
        return _RealConsole(file=buffer, width=100, force_terminal=True, color_system=None)

    return console


def drawn_counts(output: str) -> list[tuple[int, int]]:
    """The (done, total) of every frame drawn, in order: frames are separated by carriage returns / new lines."""
    frames = [_ANSI.sub("", frame).strip() for frame in re.split(r"[\r\n]", output)]
    return [tuple(int(n) for n in _COUNT.findall(frame)[-1]) for frame in frames if _COUNT.search(frame)]


def test_train_names_the_first_phases_and_its_last_frame_is_n_of_n(monkeypatch):
    updates: list[tuple[int, str | None]] = []
    original_update = train_module._ProgressBar.update

    def update(self, step, description=None):
        updates.append((step, description))
        return original_update(self, step, description)

    buffer = io.StringIO()
    monkeypatch.setattr(rich.console, "Console", terminal_into(buffer))  # train imports it when the bar starts
    monkeypatch.setattr(train_module._ProgressBar, "update", update)
    spec = RunSpec(dataset="blobs", steps=203, eval_every=100)  # 203: no multiple of the bar's refresh interval (2)
    result = train_module.run(spec, progress=True)
    assert result.status == "finished"
    phases = [description for step, description in updates if step == 0 and description]
    assert [p.split(": ", 1)[1].split(" ")[0] for p in phases[:3]] == ["loading", "building", "first"]
    counts = drawn_counts(buffer.getvalue())
    assert len(counts) >= 2, buffer.getvalue()
    assert counts[-1] == (203, 203), counts[-3:]
    assert all(total == 203 for _, total in counts)
    assert [done for done, _ in counts] == sorted(done for done, _ in counts)  # never drawn going backwards


def test_a_diverged_runs_last_frame_is_the_step_it_reached(monkeypatch):
    buffer = io.StringIO()
    monkeypatch.setattr(rich.console, "Console", terminal_into(buffer))
    spec = RunSpec(dataset="blobs", steps=203, eval_every=100, lr=1e6, optimizer="sgd")
    result = train_module.run(spec, progress=True)
    assert result.status == "diverged"
    assert drawn_counts(buffer.getvalue())[-1] == (result.diverged_step, 203)


@pytest.mark.parametrize("stored", [0, 2])
def test_sweep_last_frame_is_n_of_n_over_the_runs_it_trains(tmp_path: Path, monkeypatch, stored):
    specs = [RunSpec(width=8, steps=3, seed=seed) for seed in range(5)]
    store_path = tmp_path / "runs.sqlite"
    with Store(store_path) as store:
        for spec in specs[:stored]:
            store.save(fake_run(spec), RunProvenance.collect(0.0, 0.0))
    buffer = io.StringIO()
    monkeypatch.setattr(sweep_module, "Console", terminal_into(buffer))
    report = sweep_module.run_sweep(specs, store_path, workers=1, progress=True, run_fn=fake_run, fleet=False)
    assert (report.reused, report.finished) == (stored, 5 - stored)
    counts = drawn_counts(buffer.getvalue())
    assert counts, buffer.getvalue()
    assert counts[-1] == (5 - stored, 5 - stored), counts
    assert "finished " + str(5 - stored) in _ANSI.sub("", buffer.getvalue()).splitlines()[-1]
