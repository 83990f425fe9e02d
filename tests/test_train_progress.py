"""What ``normdrop train`` shows while it runs: the phases of a run's first seconds, and a last frame at N/N."""

from __future__ import annotations

import normdrop.train as train_module
from normdrop.spec import RunSpec


def test_progress_names_the_first_phases_and_ends_at_the_last_step(monkeypatch):
    updates: list[tuple[int, str | None]] = []
    bars: list[train_module._ProgressBar] = []
    original_update, original_exit = train_module._ProgressBar.update, train_module._ProgressBar.__exit__

    def update(self, step, description=None):
        updates.append((step, description))
        return original_update(self, step, description)

    def exit_(self, *exc_info):
        bars.append(self)
        return original_exit(self, *exc_info)

    monkeypatch.setattr(train_module._ProgressBar, "update", update)
    monkeypatch.setattr(train_module._ProgressBar, "__exit__", exit_)
    spec = RunSpec(steps=203, eval_every=100)  # 203 is no multiple of the bar's refresh interval (2 steps)
    result = train_module.run(spec, progress=True)
    assert result.status == "finished"
    phases = [description for step, description in updates if step == 0 and description]
    assert [p.split(": ", 1)[1].split(" ")[0] for p in phases[:3]] == ["loading", "building", "first"]
    (bar,) = bars
    assert bar._progress.tasks[0].completed == spec.steps == bar._progress.tasks[0].total
