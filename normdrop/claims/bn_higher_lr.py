"""bn-higher-lr: BN makes much larger learning rates usable.

On the runs of the deep learning-rate grid (shared with bn-faster), a run is *stable* when it finished without
diverging and its final training loss is below its initial one (it learned something; the ``max_loss_ratio=1``
criterion of ``normdrop.probes.stable_lr``). Per seed and arm, the largest stable learning rate is the largest grid
value whose run was stable; the effect is log10(largest stable lr with BN / without BN), in decades. The grid, not a
bisection, is searched: every run goes through the sweep in parallel and the same runs give the sensitivity curve;
the resolution is one grid step (a factor ~3, 0.5 decade).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import NORMS, Experiment, lr_grid_arms, lr_label
from normdrop.claims.figures import LABELS, color, finish, legend, new_figure, plot_band, seeds_by_x
from normdrop.claims.readers import final, initial
from normdrop.claims.results import Analysis, measure
from normdrop.claims.setting import StudySetting
from normdrop.spec import RunResult
from normdrop.stats import paired_difference


def is_stable(result: RunResult | None) -> bool | None:
    """Finished with a final training loss below the initial one; None when the run is missing or failed."""
    if result is None or result.status == "failed":
        return None
    if result.status == "diverged":
        return False
    start, end = initial(result, "train_loss"), final(result, "train_loss")
    return start is not None and end is not None and math.isfinite(end) and end < start


def largest_stable(data: ClaimData, labels: dict[float, str]) -> dict[int, tuple[float, str]]:
    """Seed -> (largest stable learning rate, censoring) where censoring is "" (bracketed), "at least" (the top of
    the grid was stable) or "below" (no grid value was: the value is one step under the grid)."""
    grid = sorted(labels)
    runs = {lr: data.runs(labels[lr]) for lr in grid}
    step = grid[1] / grid[0] if len(grid) > 1 else 10.0
    out = {}
    for seed in data.setting.seed_list:
        outcome = {lr: is_stable(runs[lr].get(seed)) for lr in grid}
        if all(value is None for value in outcome.values()):
            continue
        stable = [lr for lr, ok in outcome.items() if ok]
        if not stable:
            out[seed] = (grid[0] / step, "below")
        else:
            out[seed] = (max(stable), "at least" if max(stable) == grid[-1] else "")
    return out


class BNHigherLR(Claim):
    id = "bn-higher-lr"
    title = "BN allows larger learning rates"
    statement = "BN makes much larger learning rates usable."
    mechanism = (
        "A large learning rate makes the weights jump far; without BN, a jump that grows a layer's weights also "
        "grows everything the layers above receive, and the loss can explode. With BN the output of a layer does "
        "not change when its incoming weights are scaled up, so a big step cannot blow up the signal; larger "
        "weights even shrink the effective step (the gradient scales inversely with the weights), which keeps "
        "training stable."
    )
    rationale = (
        "The same deep plain MLP runs as bn-faster, at learning rates from 0.003 to 10 (SGD with momentum 0.9). "
        "'Usable' means the run neither diverged (non-finite loss or loss above 100) nor ended with a higher "
        "training loss than it started. Limits: the answer has the grid's resolution (a factor ~3); a seed whose "
        "largest grid value is still stable only gives a lower bound; stability within a short budget does not "
        "guarantee it over a long one."
    )
    caveats = (
        "Bjorck et al. (2018) show that BN's benefit largely comes from allowing larger learning rates, which "
        "then add gradient noise that helps generalization. BN networks with weight decay have an effective "
        "learning rate that changes during training (van Laarhoven 2017; Hoffer et al. 2018), so 'the learning "
        "rate' is not the same quantity with and without BN."
    )
    references = ("Ioffe & Szegedy 2015, section 3.3", "Bjorck, Gomes, Selman & Weinberger 2018")

    def experiment(self, setting: StudySetting) -> Experiment:
        spec = setting.spec("deep")
        return Experiment(
            arms=lr_grid_arms(setting),
            description=(
                f"The deep MLP runs of bn-faster: {spec.depth} x {spec.width} ReLU, SGD momentum {spec.momentum}, "
                f"{spec.steps} steps, learning rates {list(setting.lr_grid)}, BN vs none, seeds {setting.seed_list}."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        arms = {norm: {lr: lr_label(norm, lr) for lr in data.setting.lr_grid} for norm in NORMS}
        largest = {norm: largest_stable(data, arms[norm]) for norm in NORMS}
        log_lr = {norm: {seed: math.log10(v) for seed, (v, _) in largest[norm].items()} for norm in NORMS}
        # A seed whose two arms are both beyond the same end of the grid says nothing about their ratio.
        unidentified = {
            seed
            for seed in largest["none"].keys() & largest["batch"].keys()
            if largest["none"][seed][1] and largest["none"][seed][1] == largest["batch"][seed][1]
        }
        primary = measure(
            "largest stable learning rate, BN vs none",
            "log10(largest stable learning rate with BN / without BN), decades",
            {s: v for s, v in paired_difference(log_lr["batch"], log_lr["none"]).items() if s not in unidentified},
            "increase",
            unit="decades",
        )
        usable = {
            norm: {
                seed: float(sum(1 for lr in arms[norm] if is_stable(data.runs(arms[norm][lr]).get(seed))))
                for seed in data.setting.seed_list
            }
            for norm in NORMS
        }
        secondary = [
            measure(
                "usable learning rates of the grid, BN minus none",
                f"number of stable grid values (of {len(data.setting.lr_grid)}), BN minus none",
                paired_difference(usable["batch"], usable["none"]),
                "increase",
                unit="grid values",
            )
        ]
        findings = []
        for norm in NORMS:
            values = largest[norm]
            if values:
                censored = sum(1 for _, c in values.values() if c)
                findings.append(
                    f"{LABELS[norm]}: largest stable learning rate per seed "
                    + ", ".join(
                        f"{'>=' if c == 'at least' else '<' if c == 'below' else ''}{v:g}" for v, c in values.values()
                    )
                    + (f" ({censored} censored by the grid's ends)" if censored else "")
                )
        return Analysis(primary, secondary, [_sensitivity(data, arms), _largest(data, largest)], [], findings)


def _sensitivity(data: ClaimData, arms: dict[str, dict[float, str]]) -> Any:
    figure, axes = new_figure(ncols=2)
    grid = list(data.setting.lr_grid)
    for norm in NORMS:
        losses = {lr: {s: final(r, "train_loss") for s, r in data.runs(arms[norm][lr]).items()} for lr in grid}
        plot_band(axes[0], grid, seeds_by_x(losses, data.setting.seed_list), LABELS[norm], key=norm, marker="o")
        diverged = [
            sum(1 for r in data.runs(arms[norm][lr]).values() if r is not None and r.status == "diverged")
            for lr in grid
        ]
        unstable = [sum(1 for r in data.runs(arms[norm][lr]).values() if is_stable(r) is False) for lr in grid]
        offset = 0.84 if norm == "none" else 1.19
        axes[1].bar(
            [lr * offset for lr in grid],
            unstable,
            width=[lr * 0.3 for lr in grid],
            color=color(norm),
            label=f"{LABELS[norm]} (of which diverged: {sum(diverged)})",
        )
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("learning rate (log scale)")
    axes[0].set_ylabel("final training loss (nats, log scale)")
    legend(axes[0], fontsize=8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("learning rate (log scale)")
    axes[1].set_ylabel("unstable runs (count of seeds)")
    legend(axes[1], fontsize=8)
    return finish(
        figure,
        "Learning-rate sensitivity",
        "Left: final training loss of the runs that finished, mean over seeds with 95% band (a diverged run has no "
        "final loss and leaves a gap). Right: how many seeds were unstable (diverged, or ended above their initial "
        "loss) at each learning rate.",
    )


def _largest(data: ClaimData, largest: dict[str, dict[int, tuple[float, str]]]) -> Any:
    figure, ax = new_figure(height=2.6)
    for row, norm in enumerate(NORMS):
        values = largest[norm]
        xs = [v for v, _ in values.values()]
        jitter = np.linspace(-0.15, 0.15, len(xs)) if xs else []
        markers = ["^" if c == "at least" else "v" if c == "below" else "o" for _, c in values.values()]
        for x, dy, marker in zip(xs, jitter, markers, strict=True):
            ax.scatter(x, row + dy, color=color(norm), marker=marker, s=40)
    ax.set_yticks(range(len(NORMS)), [LABELS[n] for n in NORMS])
    ax.set_xscale("log")
    ax.set_xlim(min(data.setting.lr_grid) / 4, max(data.setting.lr_grid) * 4)
    ax.set_xlabel("largest stable learning rate (log scale)")
    ax.scatter([], [], marker="^", color="#555", label="top of the grid (a lower bound)")
    ax.scatter([], [], marker="o", color="#555", label="bracketed by the grid")
    legend(ax, fontsize=7, loc="lower right")
    return finish(
        figure,
        "Largest stable learning rate per seed",
        "One point per seed and arm: the largest grid learning rate whose run was stable.",
    )


CLAIM = BNHigherLR()
