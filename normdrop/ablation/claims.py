"""The claims ``normdrop ablate`` tests on the user's model: each declares the cells (arm, learning rate) it needs
and turns their runs into measurements with the study's statistics (:func:`normdrop.claims.base.measure`, i.e.
:func:`normdrop.stats.decide` on per-seed paired effects).

Roles: the *BN* network is the model as given when it has batch norm, else the model with BN added (``add_bn``);
the *plain* network is the given one with BN removed, or the given one. Likewise the *dropout* network is the given
one when it has dropout, else one with dropout 0.5 added before the classifier; *no dropout* removes it. So every
claim compares the user's model with its nearest ablation, whichever way round.

Supported here: bn-faster, bn-higher-lr, bn-regularizes, bn-less-dropout, dropout-overfit, dropout-generalizes,
dropout-bn-shift. Not yet: the rest (see :data:`NOT_SUPPORTED`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from normdrop.ablation.arms import GIVEN, PRECISE_BN, VARIANCE_SHIFT, Layout, arm_name
from normdrop.claims.readers import final, initial, mean_of, paired_log2, records, steps_to_reach
from normdrop.claims.results import Analysis, Measurement, measure, not_measurable
from normdrop.spec import RunResult
from normdrop.stats import paired_difference

Cells = Mapping[str, Mapping[int, RunResult | None]]
"""cell label -> seed -> result (None: not run)."""

LR_MULTIPLIERS: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0)
"""bn-higher-lr's grid: the user's learning rate times these (a factor ~3 apart, as the study's grid)."""
DROPOUT_ADDED = 0.5
"""Rate of the dropout added to a model without any (Srivastava et al. 2014's default for hidden units)."""
TARGET_FRACTION = 0.9
MATCH_CAP = 0.95
GHOST_DIVISOR = 4
"""Ghost BN arms split each batch into this many ghost batches."""

NOT_SUPPORTED: dict[str, str] = {
    "bn-mechanics": "measured on the layers themselves, independent of any model (normdrop study)",
    "dropout-mechanics": "measured on the layers themselves, independent of any model (normdrop study)",
    "bn-stable-inputs": "its probes (layer inputs, internal covariate shift) are written for the study's MLPs",
    "bn-smooth": "its probes (landscape, curvature) are written for the study's MLPs",
    "dropout-coadapt": "its probe is written for the study's MLPs",
    "dropout-ensemble": "needs explicit ensembles and MC-dropout evaluation, not wired into ablate yet",
    "summary": "summarizes the study's claims",
}
"""Claims of CLAIMS.md that ``normdrop ablate`` does not test yet, and why."""


@dataclass(frozen=True)
class Context:
    """What a claim plans from: the given model's layout and the training settings."""

    layout: Layout
    lr: float
    batch_size: int | None

    @property
    def has_bn(self) -> bool:
        return bool(self.layout.of("norm"))

    @property
    def has_dropout(self) -> bool:
        return bool(self.layout.of("dropout"))

    def arm(self, bn: bool, dropout: bool, *extra: str) -> str:
        """The arm of a role: BN or plain, dropout or none, then ``extra`` knobs."""
        bn_knob = ("" if self.has_bn else "add_bn") if bn else ("remove_bn" if self.has_bn else "")
        if dropout:
            drop_knob = "" if self.has_dropout else f"add_dropout={DROPOUT_ADDED:g}"
        else:
            drop_knob = "remove_dropout" if self.has_dropout else ""
        return arm_name(bn_knob, drop_knob, *extra)

    @property
    def dropout_rate(self) -> float:
        rates = self.layout.dropout_rates()
        return max(rates) if rates else DROPOUT_ADDED

    @property
    def other_rate(self) -> float:
        return 0.2 if math.isclose(self.dropout_rate, 0.5) else 0.5


class AblationClaim:
    """One claim tested on the user's model: :meth:`cells` (label -> (arm, lr)) and :meth:`analyze`."""

    id: ClassVar[str]
    knobs: ClassVar[str]
    """The knobs the claim needs, in words, for the report."""

    def cells(self, ctx: Context) -> dict[str, tuple[str, float]]:
        raise NotImplementedError

    def analyze(self, cells: Cells, ctx: Context) -> Analysis:
        raise NotImplementedError


def _finals(runs: Mapping[int, RunResult | None], metric: str, scale: float = 1.0) -> dict[int, float | None]:
    return {seed: None if (v := final(r, metric)) is None else scale * v for seed, r in runs.items()}


def _censored_steps(runs: Mapping[int, RunResult | None], target: float) -> dict[int, float]:
    out = {}
    for seed, result in runs.items():
        if result is None or result.status == "failed":
            continue
        reached = steps_to_reach(result, "train_accuracy", target)
        out[seed] = reached if reached is not None else float(result.spec.steps)
    return out


class BNFaster(AblationClaim):
    id = "bn-faster"
    knobs = "BN vs no BN (remove_bn, or add_bn for a model without BN), at the given learning rate"

    def cells(self, ctx: Context) -> dict[str, tuple[str, float]]:
        return {"bn": (ctx.arm(True, ctx.has_dropout), ctx.lr), "plain": (ctx.arm(False, ctx.has_dropout), ctx.lr)}

    def analyze(self, cells: Cells, ctx: Context) -> Analysis:
        metric = "log2(steps to the target training accuracy without BN / with BN), at the given learning rate"
        means = [mean_of(_finals(cells[label], "train_accuracy").values()) for label in ("bn", "plain")]
        if any(m is None for m in means):
            return Analysis(not_measurable("speed-up", metric, "increase", "an arm has no finished run"))
        target = TARGET_FRACTION * min(means)  # type: ignore[type-var]
        steps = {label: _censored_steps(cells[label], target) for label in ("bn", "plain")}
        primary = measure("speed-up with BN", metric, paired_log2(steps["plain"], steps["bn"]), "increase", unit="log2")
        findings = [f"Target: {target:.1%} training accuracy (90% of the lower arm's mean final accuracy)."]
        return Analysis(primary, findings=findings)


def is_stable(result: RunResult | None) -> bool | None:
    """Finished with a final training loss below the initial one (None: missing or failed)."""
    if result is None or result.status == "failed":
        return None
    if result.status == "diverged":
        return False
    start, end = initial(result, "train_loss"), final(result, "train_loss")
    return start is not None and end is not None and math.isfinite(end) and end < start


class BNHigherLR(AblationClaim):
    id = "bn-higher-lr"
    knobs = f"BN vs no BN at the given learning rate times {', '.join(f'{m:g}' for m in LR_MULTIPLIERS)}"

    def cells(self, ctx: Context) -> dict[str, tuple[str, float]]:
        out = {}
        for m in LR_MULTIPLIERS:
            out[f"bn lr x{m:g}"] = (ctx.arm(True, ctx.has_dropout), ctx.lr * m)
            out[f"plain lr x{m:g}"] = (ctx.arm(False, ctx.has_dropout), ctx.lr * m)
        return out

    def analyze(self, cells: Cells, ctx: Context) -> Analysis:
        largest: dict[str, dict[int, tuple[float, str]]] = {}
        for role in ("bn", "plain"):
            largest[role] = {}
            seeds = set().union(*(cells[f"{role} lr x{m:g}"].keys() for m in LR_MULTIPLIERS))
            for seed in seeds:
                outcome = {m: is_stable(cells[f"{role} lr x{m:g}"].get(seed)) for m in LR_MULTIPLIERS}
                if all(v is None for v in outcome.values()):
                    continue
                stable = [m for m, ok in outcome.items() if ok]
                if not stable:
                    largest[role][seed] = (LR_MULTIPLIERS[0] / 3, "below")
                else:
                    top = max(stable)
                    largest[role][seed] = (top, "at least" if top == LR_MULTIPLIERS[-1] else "")
        unidentified = {
            s
            for s in largest["bn"].keys() & largest["plain"].keys()
            if largest["bn"][s][1] and largest["bn"][s][1] == largest["plain"][s][1]
        }
        log_lr = {role: {s: math.log10(v) for s, (v, _) in largest[role].items()} for role in largest}
        effect = {s: v for s, v in paired_difference(log_lr["bn"], log_lr["plain"]).items() if s not in unidentified}
        primary = measure(
            "largest stable learning rate, BN vs none",
            "log10(largest stable learning rate with BN / without BN), decades (stable: finished, loss below initial)",
            effect,
            "increase",
            unit="decades",
        )
        findings = [
            f"{role}: largest stable learning rate per seed "
            + ", ".join(
                f"{'>=' if c == 'at least' else '<' if c == 'below' else ''}{v * ctx.lr:g}" for v, c in values.values()
            )
            for role, values in largest.items()
        ]
        return Analysis(primary, findings=findings)


def _at_matched(runs: Mapping[int, RunResult | None], target: float) -> dict[int, float | None]:
    from normdrop.probes import gap_at_train_accuracy

    out: dict[int, float | None] = {}
    for seed, result in runs.items():
        matched = (
            None if result is None or result.status != "finished" else gap_at_train_accuracy(result.metrics, target)
        )
        out[seed] = None if matched is None else 100 * float(matched["test_accuracy"])
    return out


def _matched_target(*arms: Mapping[int, RunResult | None]) -> float | None:
    from normdrop.probes import common_train_accuracy

    finished = [r.metrics for runs in arms for r in runs.values() if r is not None and r.status == "finished"]
    return min(MATCH_CAP, common_train_accuracy(finished)) if finished else None


class BNRegularizes(AblationClaim):
    id = "bn-regularizes"
    knobs = "BN vs no BN compared at matched training accuracy; ghost BN (batch / 4) for noisier statistics"

    def cells(self, ctx: Context) -> dict[str, tuple[str, float]]:
        out = {"bn": (ctx.arm(True, ctx.has_dropout), ctx.lr), "plain": (ctx.arm(False, ctx.has_dropout), ctx.lr)}
        if ctx.batch_size is not None and ctx.batch_size // GHOST_DIVISOR >= 2:
            out["ghost"] = (ctx.arm(True, ctx.has_dropout, f"ghost_bn={ctx.batch_size // GHOST_DIVISOR}"), ctx.lr)
        return out

    def analyze(self, cells: Cells, ctx: Context) -> Analysis:
        metric = "test accuracy with BN minus without at matched training accuracy, percentage points"
        target = _matched_target(cells["bn"], cells["plain"])
        if target is None:
            return Analysis(not_measurable("BN's regularization", metric, "increase", "no finished run"))
        bn, plain = _at_matched(cells["bn"], target), _at_matched(cells["plain"], target)
        primary = measure("BN minus none, matched fit", metric, paired_difference(bn, plain), "increase", unit="pp")
        secondary = []
        if "ghost" in cells:
            ghost_target = _matched_target(cells["bn"], cells["ghost"])
            if ghost_target is not None:
                secondary.append(
                    measure(
                        "ghost BN (smaller, noisier batches) minus BN, matched fit",
                        "test accuracy, ghost BN minus BN at matched training accuracy, pp",
                        paired_difference(
                            _at_matched(cells["ghost"], ghost_target), _at_matched(cells["bn"], ghost_target)
                        ),
                        "increase",
                        unit="pp",
                    )
                )
        return Analysis(primary, secondary, findings=[f"Matched training accuracy: {target:.1%}."])


class BNLessDropout(AblationClaim):
    id = "bn-less-dropout"
    knobs = "2 x 2: BN or not, dropout or not"

    def cells(self, ctx: Context) -> dict[str, tuple[str, float]]:
        return {
            f"{'bn' if bn else 'plain'} {'dropout' if d else 'no dropout'}": (ctx.arm(bn, d), ctx.lr)
            for bn in (True, False)
            for d in (True, False)
        }

    def analyze(self, cells: Cells, ctx: Context) -> Analysis:
        acc = {label: _finals(runs, "test_accuracy", 100) for label, runs in cells.items()}
        gain = {role: paired_difference(acc[f"{role} dropout"], acc[f"{role} no dropout"]) for role in ("bn", "plain")}
        primary = measure(
            "dropout's gain without BN minus with BN",
            "(test accuracy gain from dropout without BN) - (with BN), percentage points",
            paired_difference(gain["plain"], gain["bn"]),
            "increase",
            unit="pp",
        )
        secondary = [
            measure(
                f"dropout's gain, {role}",
                "test accuracy with minus without dropout, pp",
                gain[role],
                "increase",
                unit="pp",
            )
            for role in ("bn", "plain")
        ]
        return Analysis(primary, secondary)


class DropoutOverfit(AblationClaim):
    id = "dropout-overfit"
    knobs = "dropout vs none (remove_dropout, or add_dropout for a model without dropout)"

    def cells(self, ctx: Context) -> dict[str, tuple[str, float]]:
        return {"dropout": (ctx.arm(ctx.has_bn, True), ctx.lr), "no dropout": (ctx.arm(ctx.has_bn, False), ctx.lr)}

    def analyze(self, cells: Cells, ctx: Context) -> Analysis:
        def gaps(runs: Mapping[int, RunResult | None]) -> dict[int, float | None]:
            train, test = _finals(runs, "train_accuracy", 100), _finals(runs, "test_accuracy", 100)
            return {s: None if train[s] is None or test[s] is None else train[s] - test[s] for s in runs}

        primary = measure(
            "generalization gap without dropout minus with",
            "final (training - test) accuracy, without minus with dropout, percentage points",
            paired_difference(gaps(cells["no dropout"]), gaps(cells["dropout"])),
            "increase",
            unit="pp",
        )
        return Analysis(primary)


class DropoutGeneralizes(AblationClaim):
    id = "dropout-generalizes"
    knobs = "dropout vs none; dropout at another rate (dropout_p) beside it"

    def cells(self, ctx: Context) -> dict[str, tuple[str, float]]:
        out = {"dropout": (ctx.arm(ctx.has_bn, True), ctx.lr), "no dropout": (ctx.arm(ctx.has_bn, False), ctx.lr)}
        other = ctx.arm(ctx.has_bn, True)
        out["other p"] = (arm_name("" if other == GIVEN else other, f"dropout_p={ctx.other_rate:g}"), ctx.lr)
        return out

    def analyze(self, cells: Cells, ctx: Context) -> Analysis:
        acc = {label: _finals(runs, "test_accuracy", 100) for label, runs in cells.items()}
        metric = "final test accuracy, with minus without dropout, percentage points"
        primary = measure(
            f"test accuracy with dropout {ctx.dropout_rate:g} minus without",
            metric,
            paired_difference(acc["dropout"], acc["no dropout"]),
            "increase",
            unit="pp",
        )
        secondary = [
            measure(
                f"same at p = {ctx.other_rate:g}",
                metric,
                paired_difference(acc["other p"], acc["no dropout"]),
                "increase",
                unit="pp",
            )
        ]
        return Analysis(primary, secondary)


def _log_shift(result: RunResult | None) -> float | None:
    if result is None or result.status != "finished":
        return None
    layers = [r for r in records(result, VARIANCE_SHIFT) if r.get("layer") is not None]
    return mean_of(math.log(r["running_to_eval"]) for r in layers if r.get("running_to_eval", 0) > 0)


class DropoutBNShift(AblationClaim):
    id = "dropout-bn-shift"
    knobs = "the model as given (dropout before a BN), dropout moved after the last BN, PreciseBN re-estimation"

    def cells(self, ctx: Context) -> dict[str, tuple[str, float]]:
        return {"given": (GIVEN, ctx.lr), "moved": ("dropout_after_last_bn", ctx.lr)}

    def analyze(self, cells: Cells, ctx: Context) -> Analysis:
        primary = measure(
            "variance shift of the model as given",
            "ln(running variance / variance seen at inference), mean over BN layers (0 = no shift)",
            {s: _log_shift(r) for s, r in cells["given"].items()},
            "increase",
            unit="ln ratio",
        )
        acc = {label: _finals(runs, "test_accuracy", 100) for label, runs in cells.items()}
        precise: dict[int, float] = {}
        for seed, result in cells["given"].items():
            rows = records(result, PRECISE_BN)
            if result is not None and result.status == "finished" and rows:
                precise[seed] = 100 * (rows[-1]["test_accuracy_recalibrated"] - rows[-1]["test_accuracy"])
        secondary: list[Measurement] = [
            measure(
                "fix 1: dropout after the last BN, test accuracy gain",
                "final test accuracy, dropout moved minus as given, pp",
                paired_difference(acc["moved"], acc["given"]),
                "increase",
                unit="pp",
            ),
            measure(
                "fix 2: PreciseBN (statistics re-estimated, dropout off), test accuracy gain",
                "test accuracy after minus before re-estimating BN statistics, pp",
                precise,
                "increase",
                unit="pp",
            ),
        ]
        return Analysis(primary, secondary)


CLAIMS: dict[str, AblationClaim] = {
    claim.id: claim
    for claim in (
        BNFaster(),
        BNHigherLR(),
        BNRegularizes(),
        BNLessDropout(),
        DropoutOverfit(),
        DropoutGeneralizes(),
        DropoutBNShift(),
    )
}
"""The claims ``normdrop ablate`` tests, by id (ids of CLAIMS.md)."""


def probes_for(arm: str, ctx: Context) -> tuple[str, ...]:
    """End-of-training measurements of an arm's runs: PreciseBN and variance shift when it has BN."""
    has_bn = ("remove_bn" not in arm) and (ctx.has_bn or "add_bn" in arm)
    return (PRECISE_BN, VARIANCE_SHIFT) if has_bn else ()


def describe_context(ctx: Context) -> dict[str, Any]:
    return {"has_bn": ctx.has_bn, "has_dropout": ctx.has_dropout, "dropout_rate": ctx.dropout_rate}
