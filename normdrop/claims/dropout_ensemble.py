"""dropout-ensemble: a dropout network behaves like an average over many thinned networks.

Per replicate seed r (:data:`SEED_FACTOR` times the setting's evaluation seeds, for power: 10 by default), the plain
small network trained with dropout :attr:`StudySetting.primary_dropout`, keeping its final weights. The analysis
rebuilds it and scores on the whole test set (:func:`normdrop.probes.ensemble_comparison`):

    weight scaling   p_ws(y|x)   = softmax(f(x))                      (dropout off: the ordinary eval network)
    MC dropout       p_mc,k(y|x) = (1/k) sum_i softmax(f(x; mask_i))   (k random masks, k up to :data:`MC_PASSES`)
    explicit ensemble p_ens,n    = (1/n) sum_j softmax(f_j(x))         (n dropout-trained nets, weight-scaled)

For the first ``setting.seeds`` replicates the explicit ensemble has :data:`ENSEMBLE_SIZE` members, all trained with
the same dropout on replicate r's training subset (``data_seed = r``) from different initializations: the dropout
net r itself and ``ENSEMBLE_SIZE - 1`` more runs. Each is scored by accuracy, NLL = -mean ln p(y|x), and the
expected calibration error over :data:`normdrop.probes.ensemble.ECE_BINS` (15) equal-width confidence bins.

Primary: per seed, NLL of the MC average of :data:`MC_PASSES` masks minus NLL of weight scaling (nats), with an
equivalence margin of :attr:`DropoutEnsemble.MARGIN_NLL`: "behaves like" holds if the interval lies inside the band;
if the MC average is clearly better (or worse) calibrated in likelihood, the claim as stated is contradicted for
probabilities even when the two agree on the predicted class. Accuracy and ECE differences are secondaries.

**Interval of the primary.** Every replicate is scored on the same fixed test set, so a t interval over replicates
leaves that set's sampling error out (the replicates share it). The per-seed gap is a mean over test examples,

    gap_r = (1/N) sum_i d_ri,   d_ri = -ln p_mc,50(y_i|x_i) + ln p_ws(y_i|x_i)

(:func:`normdrop.probes.ensemble.mc_example_nll_gap`, the same 50 masks as the records), so the interval is the
hull of the t interval over replicates and a bootstrap over replicates and test examples
(:func:`normdrop.claims.small_family.example_estimate`, :func:`normdrop.significance.with_example_error`), and the
TOST decision is read off that interval. The secondaries (accuracy, ECE, the explicit ensemble) keep the t interval
over replicates alone, and their notes say so; ECE is not a mean over examples (it bins them), so it would need a
bootstrap that recomputes the bins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import Experiment
from normdrop.claims.figures import finish, legend, message_figure, new_figure, plot_band
from normdrop.claims.readers import final_model
from normdrop.claims.results import Analysis, measure, not_measurable
from normdrop.claims.setting import StudySetting
from normdrop.claims.small_family import example_estimate
from normdrop.probes import ensemble_comparison
from normdrop.probes.ensemble import ECE_BINS, mc_example_nll_gap
from normdrop.significance import min_detectable_effect
from normdrop.spec import RunResult, RunSpec
from normdrop.stats import paired_difference
from normdrop.train import load_run_dataset

SEED_FACTOR = 2
"""Replicates = this many times the setting's evaluation seeds (10 of the default 5): the effects are small."""
ENSEMBLE_SIZE = 3
"""Dropout-trained networks in each explicit ensemble (the replicate's own dropout net and 2 more)."""
MEMBER_SEED_BASE = 5000
"""Seeds of the extra ensemble members: MEMBER_SEED_BASE + 10 r + i (clear of evaluation and selection seeds)."""
MC_PASSES = 50
"""Masks of the primary's MC average (Srivastava et al.'s figure 11 levels off by about 50)."""
MC_SIZES = (1, 2, 5, 10, 20, MC_PASSES)
"""k of the MC curves in the figure."""
GAP_TOLERANCE = 1e-9
"""Largest |mean of the per-example NLL gaps - the records' NLL gap| (nats) for the per-example values to count as
those of the primary (the same masks; only rounding differs)."""
DROPOUT_ARM = "dropout net"
KEEP = ("final_weights",)
"""What every run of this claim keeps: the analysis evaluates the trained networks again."""

SEED_ONLY = "t interval over replicates only (the test set's sampling error is not included)"
"""What the secondaries' notes say about their intervals."""

_SCORED: dict[tuple[Any, ...], tuple[tuple[int, ...], list[dict[str, Any]], np.ndarray]] = {}
"""(dropout net, members, scorers) -> (ks, records, per-example NLL gap) already computed in this process: the
study's re-analysis on half the seeds reads the same stored runs again (they depend only on the runs, the ks and
the fixed MC seed)."""


def member_label(index: int) -> str:
    """Arm label of the ``index``-th extra member of the first replicates' explicit ensembles."""
    return f"dropout member {index + 1}"


def replicates(setting: StudySetting) -> list[int]:
    """The replicate seeds of the dropout nets: ``0 .. SEED_FACTOR * seeds - 1``."""
    return list(range(SEED_FACTOR * setting.seeds))


def member_spec(setting: StudySetting, replicate: int, index: int) -> RunSpec:
    """Extra member ``index`` of replicate ``replicate``'s ensemble: same data subset, another initialization."""
    return setting.spec(
        "small",
        norm="none",
        dropout=setting.primary_dropout,
        probes=(),
        keep=KEEP,
        seed=MEMBER_SEED_BASE + 10 * replicate + index,
        data_seed=replicate,
    )


def arm_runs(data: ClaimData, label: str, count: int) -> dict[int, RunResult | None]:
    """Replicate -> result of one of this claim's arms, for the first ``count`` replicates (the arms name
    replicates beyond the setting's evaluation seeds, which :meth:`ClaimData.runs` leaves out)."""
    specs = data.experiment.arms.get(label, [])
    seeds = data.experiment.replicates.get(label, [])
    return {seed: data.results.get(spec.run_id) for seed, spec in zip(seeds, specs, strict=False) if seed < count}


class DropoutEnsemble(Claim):
    id = "dropout-ensemble"
    title = "Dropout as an ensemble"
    statement = "A dropout network behaves like an average over many thinned networks."
    mechanism = (
        "Each training step with dropout updates one random 'thinned' network (the units that survived); all the "
        "thinned networks share weights. At test time, averaging the predictions of all of them is impossible (there "
        "are 2^units), so dropout uses the full network with every unit on - 'weight scaling'. The claim is that "
        "this single network predicts like the average of many sampled thinned networks (Monte-Carlo dropout), "
        "i.e. that the dropout network is a cheap stand-in for an ensemble."
    )
    rationale = (
        "The plain small network with dropout 0.5 (where dropout matters) is evaluated on the whole test set with "
        "weight scaling and with Monte-Carlo averages of k random masks, scored by accuracy, negative "
        "log-likelihood (NLL) and calibration (ECE, 15 equal-width confidence bins). The primary is the NLL "
        "difference: 'behaves like' is a statement about the predicted probabilities, and NLL is the proper "
        "scoring rule for them, while accuracy compares only the arg-max. Ten replicates (twice the evaluation "
        "seeds), because the differences are small; every replicate is scored on the same test set, so the "
        "primary's interval also resamples the test examples (it includes the test set's sampling error). Beside "
        "it, an explicit ensemble of three dropout-trained networks (same training subset, different "
        "initializations). Limits: a small network; three ensemble "
        "members; BN-free networks, so no BN statistics are involved."
    )
    caveats = (
        "The weight-scaled network is exactly the average only for a network linear in its dropped units; with "
        "nonlinearities it approximates the geometric mean of the thinned networks (Baldi & Sadowski 2013), which "
        "predicts the same class but is more confident, so weight scaling and the MC average can agree on "
        "accuracy and still differ in NLL and calibration. Gal & Ghahramani (2016) read MC dropout as "
        "approximate Bayesian inference and find it better calibrated than weight scaling; explicit ensembles of "
        "independently trained networks are usually better still (Lakshminarayanan et al. 2017), because their "
        "members differ more than thinned networks that share weights."
    )
    probes = ()
    references = ("Srivastava et al. 2014, section 7.5 and figure 11", "Gal & Ghahramani 2016", "Guo et al. 2017")
    budget_reanalysis = False
    MARGIN_NLL = 0.05
    """Equivalence margin of the primary, nats of test NLL (fixed before any data)."""
    MARGIN_PP = 1.0
    """Equivalence margin of the accuracy secondary, percentage points."""
    MARGIN_ECE = 0.02
    """Equivalence margin of the ECE secondary (ECE is a fraction)."""

    def experiment(self, setting: StudySetting) -> Experiment:
        seeds = replicates(setting)
        dropout_specs = [
            setting.spec("small", norm="none", dropout=setting.primary_dropout, probes=(), keep=KEEP, seed=seed)
            for seed in seeds
        ]
        experiment = Experiment()
        experiment.add(DROPOUT_ARM, dropout_specs, seeds)
        with_members = setting.seed_list
        for index in range(ENSEMBLE_SIZE - 1):
            experiment.add(member_label(index), [member_spec(setting, r, index) for r in with_members], with_members)
        spec = dropout_specs[0]
        experiment.description = (
            f"{len(seeds)} replicates (seeds {seeds[0]}..{seeds[-1]}: {SEED_FACTOR} x the evaluation seeds): "
            f"{spec.model} depth {spec.depth} x {spec.width} with dropout {setting.primary_dropout} on "
            f"{setting.small_train_size} examples of {setting.dataset} drawn per replicate ({spec.steps} steps), final "
            f"weights kept; for the first {len(with_members)}, {ENSEMBLE_SIZE - 1} more networks trained the same way "
            f"on the same subset (seeds from {MEMBER_SEED_BASE}) form explicit ensembles of {ENSEMBLE_SIZE}; scored "
            f"on the whole test set (MC averages of up to {MC_PASSES} masks, ECE with {ECE_BINS} bins); nothing is "
            "chosen from the data."
        )
        return experiment

    def analyze(self, data: ClaimData) -> Analysis:
        count = SEED_FACTOR * data.setting.seeds
        ks = MC_SIZES if data.draw else (MC_PASSES,)
        per_seed: dict[int, list[dict[str, Any]]] = {}
        examples: dict[int, np.ndarray] = {}
        members_of = {i: arm_runs(data, member_label(i), count) for i in range(ENSEMBLE_SIZE - 1)}
        for seed, result in arm_runs(data, DROPOUT_ARM, count).items():
            scored = _scores(result, [members_of[i].get(seed) for i in range(ENSEMBLE_SIZE - 1)], ks)
            if scored is not None:
                per_seed[seed], examples[seed] = scored
        metric = f"test NLL of the MC average over {MC_PASSES} masks minus weight-scaled, nats"
        if not per_seed:
            reason = "no dropout run finished with its weights kept (runs missing, failed or diverged)"
            figures = [message_figure("Accuracy and NLL vs number of networks averaged", reason)] if data.draw else []
            return Analysis(
                not_measurable("MC average vs weight scaling (NLL)", metric, "equal", reason, margin=self.MARGIN_NLL),
                figures=figures,
            )

        def per(method: str, k: int | None, field: str) -> dict[int, float | None]:
            return {seed: _pick(rows, method, k, field) for seed, rows in per_seed.items()}

        nll_gap = paired_difference(per("mc", MC_PASSES, "nll"), per("weight_scaled", None, "nll"))
        estimate, interval = example_estimate(
            nll_gap,
            examples,
            missing="no per-example NLLs",
            tolerance=GAP_TOLERANCE,
        )
        spec = data.setting.spec("small")
        note = (
            f"{len(nll_gap)} replicates; {spec.model} depth {spec.depth} x {spec.width}, dropout "
            f"{data.setting.primary_dropout}, {data.setting.small_train_size} training examples per replicate, "
            f"{spec.steps} steps; whole test set; margin {self.MARGIN_NLL} nats fixed in advance; {interval}; the "
            "equivalence test reads that interval."
        )
        values = list(nll_gap.values())
        if len(values) >= 2:
            mde = min_detectable_effect(float(np.std(values, ddof=1)), len(values))
            note += f" Minimum detectable effect (80% power, one-sided 5%): {mde:.3g} nats."
        primary = measure(
            f"MC average over {MC_PASSES} masks vs weight scaling (NLL)",
            metric,
            nll_gap,
            "equal",
            margin=self.MARGIN_NLL,
            unit="nats",
            note=note,
            estimate=estimate,
        )
        secondary = [
            measure(
                f"MC average over {MC_PASSES} masks vs weight scaling (accuracy)",
                "test accuracy, MC average minus weight-scaled, percentage points",
                paired_difference(per("mc", MC_PASSES, "accuracy"), per("weight_scaled", None, "accuracy"), scale=100),
                "equal",
                margin=self.MARGIN_PP,
                unit="pp",
                note=f"{SEED_ONLY}.",
            ),
            measure(
                f"MC average over {MC_PASSES} masks vs weight scaling (ECE)",
                f"expected calibration error ({ECE_BINS} equal-width bins), MC average minus weight-scaled",
                paired_difference(per("mc", MC_PASSES, "ece"), per("weight_scaled", None, "ece")),
                "equal",
                margin=self.MARGIN_ECE,
                unit="ECE",
                note=f"{SEED_ONLY}.",
            ),
        ]
        for field, scale, unit, label in (("nll", 1.0, "nats", "NLL"), ("accuracy", 100.0, "pp", "accuracy")):
            secondary.append(
                measure(
                    f"explicit ensemble of {ENSEMBLE_SIZE} dropout nets minus the MC average ({label})",
                    f"test {label}, ensemble of {ENSEMBLE_SIZE} dropout-trained nets (weight-scaled) minus the MC "
                    f"average over {MC_PASSES} masks of one of them",
                    paired_difference(per("ensemble", ENSEMBLE_SIZE, field), per("mc", MC_PASSES, field), scale=scale),
                    "decrease" if field == "nll" else "increase",
                    unit=unit,
                    note=f"Lakshminarayanan et al. (2017) find explicit ensembles better than MC dropout. {SEED_ONLY}.",
                )
            )
        findings = []
        agreement = [v for v in per("mc", MC_PASSES, "agreement_weight_scaled").values() if v is not None]
        if agreement:
            findings.append(
                f"The MC average over {MC_PASSES} masks predicts the same class as the weight-scaled network on "
                f"{np.mean(agreement):.1%} of test examples (mean over replicates)."
            )
        figures = [_versus_k(per_seed, ks)] if data.draw else []
        return Analysis(primary, secondary, figures, [], findings)


def _scores(
    result: RunResult | None, members: Sequence[RunResult | None], ks: Sequence[int]
) -> tuple[list[dict[str, Any]], np.ndarray] | None:
    """The records of :func:`ensemble_comparison` for one replicate and its per-example NLL gap (MC average of
    :data:`MC_PASSES` masks minus weight scaling, :func:`mc_example_nll_gap`); None when its dropout net is
    unusable. The explicit ensemble only when every member is usable. Served from :data:`_SCORED` when these runs
    were scored before with these ks among others and the same largest k (the same max(ks) passes from the fixed
    MC seed)."""
    if result is None or result.status != "finished":
        return None
    key = (
        result.run_id,
        tuple(None if m is None else (m.run_id, m.status) for m in members),
        ensemble_comparison,
        mc_example_nll_gap,
    )
    cached = _SCORED.get(key)
    if cached is not None and set(ks) <= set(cached[0]) and max(ks) == max(cached[0]):
        return [r for r in cached[1] if r["method"] != "mc" or r["k"] in ks], cached[2]
    model = final_model(result)
    if model is None:
        return None
    nets = [final_model(member) for member in members]
    ensemble = [model, *nets] if all(net is not None for net in nets) else []
    dataset = load_run_dataset(result.spec)
    rows = ensemble_comparison(model, ensemble, dataset.x_test, dataset.y_test, ks)
    gap = np.asarray(mc_example_nll_gap(model, dataset.x_test, dataset.y_test, MC_PASSES), dtype=np.float64)
    if len(_SCORED) >= 512:
        _SCORED.clear()
    _SCORED[key] = (tuple(ks), rows, gap)
    return rows, gap


def _pick(rows: list[dict[str, Any]], method: str, k: int | None, field: str) -> float | None:
    found = [r.get(field) for r in rows if r["method"] == method and r["k"] == k]
    value = found[0] if found else None
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _versus_k(per_seed: dict[int, list[dict[str, Any]]], ks: Sequence[int]) -> Any:
    figure, axes = new_figure(ncols=3, width=8.4)
    seeds = sorted(per_seed)
    for ax, field, label in zip(
        axes,
        ("accuracy", "nll", "ece"),
        ("test accuracy (fraction)", "test NLL (nats)", f"ECE ({ECE_BINS} bins)"),
        strict=True,
    ):
        mc = np.array([[_value(per_seed[s], "mc", k, field) for k in ks] for s in seeds])
        plot_band(ax, list(ks), mc, "MC average of k thinned nets", key="mc", marker="o")
        sizes = sorted({r["k"] for s in seeds for r in per_seed[s] if r["method"] == "ensemble"})
        with_ensemble = [s for s in seeds if any(r["method"] == "ensemble" for r in per_seed[s])]
        if sizes and with_ensemble:
            ens = np.array([[_value(per_seed[s], "ensemble", n, field) for n in sizes] for s in with_ensemble])
            plot_band(ax, sizes, ens, "explicit ensemble of n dropout nets", key="ensemble", marker="s")
        ws = np.array([[_value(per_seed[s], "weight_scaled", None, field)] * len(ks) for s in seeds])
        plot_band(ax, list(ks), ws, "weight scaling (one pass)", key="weight scaled", linestyle="--")
        ax.set_xscale("log")
        ax.set_xlabel("networks averaged (log scale)")
        ax.set_ylabel(label)
    legend(axes[0], fontsize=7)
    return finish(
        figure,
        "Weight scaling vs Monte-Carlo averaging vs an explicit ensemble",
        "Test accuracy, negative log-likelihood and expected calibration error as more networks are averaged: k "
        "thinned networks of one dropout network (random masks), or n dropout-trained networks (the first "
        "replicates only); the dashed line is the ordinary weight-scaled dropout network. Mean over replicates with "
        "95% bands.",
    )


def _value(rows: list[dict[str, Any]], method: str, k: int | None, field: str) -> float:
    value = _pick(rows, method, k, field)
    return np.nan if value is None else value


CLAIM = DropoutEnsemble()
