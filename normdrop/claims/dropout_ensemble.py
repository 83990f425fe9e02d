"""dropout-ensemble: a dropout network behaves like an average over many thinned networks.

Per replicate seed: one plain small network trained with dropout 0.5, and an explicit ensemble of independently
trained networks without dropout (other seeds). These runs keep their final weights (``keep=("final_weights",)``,
also what a spec listing the ``ensemble`` probe keeps by default), so the analysis rebuilds the networks and calls
``normdrop.probes.ensemble_comparison`` on the test set: weight-scaled inference (the normal eval-mode network),
Monte-Carlo averages of k thinned networks (k = 1..100 random masks), and the average of the first n independent
networks. The claim holds if the cheap weight-scaled network predicts like the average of many thinned ones:
effect per seed = accuracy of the MC average over 100 masks minus weight-scaled accuracy, in percentage points,
with an equivalence margin of 1 point.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import SMALL_PROBES, Experiment, small_arm
from normdrop.claims.figures import finish, legend, message_figure, new_figure, plot_band
from normdrop.claims.readers import final_model
from normdrop.claims.results import Analysis, measure, not_measurable
from normdrop.claims.setting import StudySetting
from normdrop.probes import ensemble_comparison
from normdrop.probes.ensemble import MC_SIZES
from normdrop.stats import paired_difference
from normdrop.train import load_run_dataset

MEMBER_SEED_BASE = 1000
MARGIN_PP = 1.0
MARGIN_NLL = 0.05
DROPOUT_ARM = "dropout net"
KEEP = ("final_weights",)
"""What every run of this claim keeps: the analysis evaluates the trained networks again."""


def member_label(index: int) -> str:
    """Arm label of the ``index``-th independent network of every replicate."""
    return f"independent net {index + 1}"


class DropoutEnsemble(Claim):
    id = "dropout-ensemble"
    title = "Dropout as an ensemble"
    statement = "A dropout network behaves like an average over many thinned networks."
    mechanism = (
        "Each training step with dropout updates one random 'thinned' network (the units that survived); all the "
        "thinned networks share weights. At test time, averaging the predictions of all of them is impossible (there "
        "are 2^units), so dropout uses the full network with every unit on - 'weight scaling'. The claim is that "
        "this single network predicts about as well as the average of many sampled thinned networks (Monte-Carlo "
        "dropout), and that it behaves like an ensemble."
    )
    rationale = (
        "The plain small network with dropout 0.5 on 500 examples (where dropout matters) is evaluated on the test "
        "set with weight scaling and with Monte-Carlo averages of k random masks, k = 1 to 100; next to it, an "
        "explicit ensemble of independently trained networks without dropout, growing from 1 to "
        "the number of members. Limits: a small network; few ensemble members; MC averaging uses BN-free networks "
        "here, so no BN statistics are involved."
    )
    caveats = (
        "The weight-scaled network is exactly the average only for a network linear in its dropped units; with "
        "nonlinearities it approximates the geometric mean of the thinned networks (Baldi & Sadowski 2013). "
        "Gal & Ghahramani (2016) read MC dropout as approximate Bayesian inference and find it better calibrated "
        "than weight scaling; explicit ensembles of independently trained networks are usually better still "
        "(Lakshminarayanan et al. 2017), because their members differ more than thinned networks that share weights."
    )
    probes = ("ensemble",)
    references = ("Srivastava et al. 2014, section 7.5 and figure 11", "Gal & Ghahramani 2016")

    def experiment(self, setting: StudySetting) -> Experiment:
        probes = (*SMALL_PROBES, "ensemble")
        _, dropout_specs = small_arm(setting, "none", setting.primary_dropout, probes=probes, keep=KEEP)
        arms = {DROPOUT_ARM: dropout_specs}
        members = setting.ensemble_members
        for index in range(members):
            arms[member_label(index)] = [
                setting.spec(
                    "small",
                    norm="none",
                    dropout=0.0,
                    probes=probes,
                    keep=KEEP,
                    seed=MEMBER_SEED_BASE + replicate * members + index,
                )
                for replicate in setting.seed_list
            ]
        spec = dropout_specs[0]
        return Experiment(
            arms=arms,
            description=(
                f"Per replicate seed in {setting.seed_list}: MLP {spec.depth} x {spec.width} with dropout "
                f"{setting.primary_dropout} on {setting.small_train_size} examples of {setting.dataset} ({spec.steps} "
                f"steps), and {members} independently trained networks without dropout (seeds from "
                f"{MEMBER_SEED_BASE}); evaluated on the whole test set."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        members = data.setting.ensemble_members
        per_seed: dict[int, list[dict[str, Any]]] = {}
        for seed, result in data.runs(DROPOUT_ARM).items():
            model = final_model(result)
            if model is None:
                continue
            nets = [final_model(data.runs(member_label(i)).get(seed)) for i in range(members)]
            nets = [net for net in nets if net is not None]
            dataset = load_run_dataset(result.spec)
            per_seed[seed] = ensemble_comparison(model, nets, dataset.x_test, dataset.y_test, MC_SIZES)
        metric = "test accuracy of the MC average over 100 masks minus weight-scaled, percentage points"
        if not per_seed:
            reason = "no dropout run finished with its weights kept (runs failed or diverged, or keep no final_weights)"
            return Analysis(
                not_measurable("MC average vs weight scaling", metric, "equal", reason, margin=MARGIN_PP),
                figures=[message_figure("Accuracy vs number of networks averaged", reason)],
            )
        k_max = max(MC_SIZES)

        def pick(rows: list[dict[str, Any]], method: str, k: int | None, field: str) -> float | None:
            found = [r[field] for r in rows if r["method"] == method and r["k"] == k]
            return float(found[0]) if found and found[0] is not None else None

        def per(method: str, k: int | None, field: str) -> dict[int, float | None]:
            return {seed: pick(rows, method, k, field) for seed, rows in per_seed.items()}

        primary = measure(
            f"MC average over {k_max} masks vs weight scaling (accuracy)",
            metric,
            paired_difference(per("mc", k_max, "accuracy"), per("weight_scaled", None, "accuracy"), scale=100),
            "equal",
            margin=MARGIN_PP,
            unit="pp",
        )
        n_max = max((len([r for r in rows if r["method"] == "ensemble"]) for rows in per_seed.values()), default=0)
        secondary = [
            measure(
                f"MC average over {k_max} masks vs weight scaling (NLL)",
                "test negative log-likelihood, MC average minus weight-scaled, nats",
                paired_difference(per("mc", k_max, "nll"), per("weight_scaled", None, "nll")),
                "equal",
                margin=MARGIN_NLL,
                unit="nats",
            ),
        ]
        if n_max:
            secondary.append(
                measure(
                    f"explicit ensemble of {n_max} independent nets minus the MC average (accuracy)",
                    "test accuracy, explicit ensemble minus MC average over 100 masks, percentage points",
                    paired_difference(per("ensemble", n_max, "accuracy"), per("mc", k_max, "accuracy"), scale=100),
                    "increase",
                    unit="pp",
                )
            )
        agreement = [v for v in per("mc", k_max, "agreement_weight_scaled").values() if v is not None]
        findings = []
        if agreement:
            findings.append(
                f"The MC average over {k_max} masks predicts the same class as the weight-scaled network on "
                f"{np.mean(agreement):.1%} of test examples (mean over seeds)."
            )
        return Analysis(primary, secondary, [_versus_k(data, per_seed, MC_SIZES)], [], findings)


def _versus_k(data: ClaimData, per_seed: dict[int, list[dict[str, Any]]], ks: Any) -> Any:
    figure, axes = new_figure(ncols=2)
    seeds = sorted(per_seed)
    for ax, field, label in zip(
        axes, ("accuracy", "nll"), ("test accuracy (fraction)", "test NLL (nats)"), strict=True
    ):
        mc = np.array([[_value(per_seed[s], "mc", k, field) for k in ks] for s in seeds])
        plot_band(ax, list(ks), mc, "MC average of k thinned nets", key="mc", marker="o")
        sizes = sorted({r["k"] for s in seeds for r in per_seed[s] if r["method"] == "ensemble"})
        if sizes:
            ens = np.array([[_value(per_seed[s], "ensemble", n, field) for n in sizes] for s in seeds])
            plot_band(ax, sizes, ens, "explicit ensemble of n independent nets", key="ensemble", marker="s")
        ws = np.array([[_value(per_seed[s], "weight_scaled", None, field)] * len(ks) for s in seeds])
        plot_band(ax, list(ks), ws, "weight scaling (one pass)", key="weight scaled", linestyle="--")
        ax.set_xscale("log")
        ax.set_xlabel("networks averaged (log scale)")
        ax.set_ylabel(label)
    legend(axes[0], fontsize=7)
    return finish(
        figure,
        "Weight scaling vs Monte-Carlo averaging vs an explicit ensemble",
        "Test accuracy and negative log-likelihood as more networks are averaged: k thinned networks of the one "
        "dropout network (random masks), or n independently trained networks without dropout; the dashed line is "
        "the ordinary weight-scaled dropout network. Mean over replicate seeds with 95% bands.",
    )


def _value(rows: list[dict[str, Any]], method: str, k: int | None, field: str) -> float:
    found = [r[field] for r in rows if r["method"] == method and r["k"] == k]
    return float(found[0]) if found and found[0] is not None else np.nan


CLAIM = DropoutEnsemble()
