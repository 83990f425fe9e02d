"""The largest stable learning rate: a search over runs, not a hook.

"BN makes much larger learning rates usable" (Ioffe & Szegedy 2015, section 3.3; Bjorck, Gomes, Selman &
Weinberger 2018, "Understanding Batch Normalization") is measured as the largest learning rate whose run does not
diverge within a step budget. The search, for one configuration and seed, on a log scale:

1. bracket: from the base spec's learning rate, multiply by ``factor`` while runs are stable (or divide while they
   diverge) until one stable and one diverging learning rate are found, or ``lr_max`` / ``lr_min`` is reached;
2. bisect: try the geometric mean sqrt(lo * hi) of the largest stable ``lo`` and the smallest diverging ``hi`` until
   hi / lo <= 1 + ``rel_tol``.

It assumes stability is monotone in the learning rate (true of the quantity in expectation, not always of one seed);
every run is recorded, so a non-monotone outcome shows in the records. A run "diverges" when the trainer stops it
(a non-finite batch loss or one above ``spec.diverge_loss``), or, with ``max_loss_ratio`` set, when its final
training loss is non-finite or above ``max_loss_ratio`` times its initial training loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from normdrop import train
from normdrop.probes.base import Record, tidy_record
from normdrop.spec import RunResult, RunSpec

NAME = "stable_lr"


@dataclass
class StableLRResult:
    """The outcome of one search.

    ``largest_stable`` is the largest learning rate seen that did not diverge (None if every run diverged);
    ``smallest_diverging`` the smallest that did (None if none did); ``bracketed`` says both were found, so the
    answer lies between them within the tolerance. ``trials`` are one record per run, in the order run.
    """

    base_run_id: str
    largest_stable: float | None
    smallest_diverging: float | None
    bracketed: bool
    trials: list[Record] = field(default_factory=list)

    def records(self) -> list[Record]:
        """The trials followed by one summary record (``phase="result"``), all tidy probe records."""
        summary = tidy_record(
            NAME,
            self.trials[-1]["step"] if self.trials else 0,
            {
                "phase": "result",
                "base_run_id": self.base_run_id,
                "largest_stable_lr": self.largest_stable,
                "smallest_diverging_lr": self.smallest_diverging,
                "bracketed": self.bracketed,
                "runs": len(self.trials),
            },
        )
        return [*self.trials, summary]


def _is_diverged(result: RunResult, max_loss_ratio: float | None) -> bool:
    if result.status == "failed":
        raise RuntimeError(f"run {result.run_id} at lr={result.spec.lr:g} failed: {result.error}")
    if result.status == "diverged":
        return True
    if max_loss_ratio is None:
        return False
    initial = next((value for step, name, value in result.metrics if step == 0 and name == "train_loss"), None)
    final = result.summary.get("train_loss")
    if final is None or not math.isfinite(final):
        return True
    return initial is not None and final > max_loss_ratio * initial


def largest_stable_lr(
    base: RunSpec,
    *,
    steps: int | None = None,
    lr_min: float = 1e-5,
    lr_max: float = 1e3,
    factor: float = 4.0,
    rel_tol: float = 0.1,
    max_runs: int = 30,
    max_loss_ratio: float | None = None,
    run_fn: Callable[[RunSpec], RunResult] | None = None,
) -> StableLRResult:
    """Search for the largest learning rate at which ``base`` (with its other fields, seed included) does not diverge.

    Args:
        base: the configuration; its ``lr`` is the starting point (clipped into [lr_min, lr_max]).
        steps: the step budget of each run (default: ``base.steps``); evaluation happens only at the end, and the
            base's probes are dropped, since only divergence matters.
        lr_min, lr_max: the search range; a result at either end is not bracketed.
        factor: the bracketing multiplier (> 1).
        rel_tol: bisect until smallest_diverging / largest_stable <= 1 + rel_tol.
        max_runs: a hard cap on the number of runs.
        max_loss_ratio: also count as diverged a run whose final training loss exceeds this multiple of its
            initial one (None: only the trainer's divergence counts).
        run_fn: trains one spec (default :func:`normdrop.train.run`); a sweep may pass a cached or remote runner.
    """
    if not 0 < lr_min < lr_max:
        raise ValueError(f"need 0 < lr_min < lr_max, got lr_min={lr_min}, lr_max={lr_max}")
    if factor <= 1 or rel_tol <= 0 or max_runs < 2:
        raise ValueError(f"need factor > 1, rel_tol > 0 and max_runs >= 2, got {factor}, {rel_tol}, {max_runs}")
    run_fn = train.run if run_fn is None else run_fn
    budget = base.steps if steps is None else steps
    fields: dict[str, Any] = {**base.model_dump(), "steps": budget, "eval_every": budget, "probes": ()}
    fields["warmup_steps"] = min(base.warmup_steps, budget - 1)
    trials: list[Record] = []
    outcome: dict[float, bool] = {}

    def diverges(lr: float, phase: str) -> bool:
        if lr not in outcome:
            result = run_fn(RunSpec.model_validate({**fields, "lr": lr}))
            outcome[lr] = _is_diverged(result, max_loss_ratio)
            trials.append(
                tidy_record(
                    NAME,
                    budget,
                    {
                        "phase": phase,
                        "lr": lr,
                        "diverged": outcome[lr],
                        "status": result.status,
                        "diverged_step": result.diverged_step,
                        "final_train_loss": result.summary.get("train_loss"),
                        "run_id": result.run_id,
                        "base_run_id": base.run_id,
                    },
                )
            )
        return outcome[lr]

    lr = min(max(base.lr, lr_min), lr_max)
    stable: float | None = None
    diverging: float | None = None
    if diverges(lr, "bracket"):
        diverging = lr
        while diverging > lr_min and len(trials) < max_runs:
            lr = max(diverging / factor, lr_min)
            if not diverges(lr, "bracket"):
                stable = lr
                break
            diverging = lr
    else:
        stable = lr
        while stable < lr_max and len(trials) < max_runs:
            lr = min(stable * factor, lr_max)
            if diverges(lr, "bracket"):
                diverging = lr
                break
            stable = lr
    if stable is not None and diverging is not None:
        while diverging / stable > 1 + rel_tol and len(trials) < max_runs:
            middle = math.sqrt(stable * diverging)
            if diverges(middle, "bisect"):
                diverging = middle
            else:
                stable = middle
    return StableLRResult(base.run_id, stable, diverging, stable is not None and diverging is not None, trials)
