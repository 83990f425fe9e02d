"""Dropout as an ensemble: weight-scaled inference vs Monte-Carlo averaging vs independently trained networks.

Srivastava et al. (2014, section 7.5) read a dropout network as an ensemble of the 2^n thinned networks that share
weights, and its weight-scaled (eval-mode) output as a cheap approximation of their average; they check it against
Monte-Carlo averaging of k sampled thinned networks. Gal & Ghahramani (2016, "Dropout as a Bayesian
Approximation") use that MC average as the predictive distribution:

    p_mc,k(y | x) = (1/k) sum_{i=1..k} softmax(f(x; mask_i))        (dropout on, BN with running statistics)
    p_ws(y | x)   = softmax(f(x))                                     (dropout off: weight scaling)
    p_ens,n(y | x) = (1/n) sum_{j=1..n} softmax(f_j(x))              (n networks trained independently)

For every method and size the records give accuracy, NLL = -mean log p(y|x), the expected calibration error (ECE,
Guo et al. 2017, with :data:`ECE_BINS` equal-width bins of confidence),

    ECE = sum_b (n_b / N) |acc_b - conf_b|,   bin b = ((b-1)/B, b/B] of the confidence max_c p(c|x)

(acc_b and conf_b: the accuracy and the mean confidence of the n_b examples in bin b; a confidence of exactly 0
goes to the first bin), and agreement (fraction of equal argmax predictions) with weight scaling and with the full
explicit ensemble. When the network is linear in its
dropped units the mean of the MC logits converges to the weight-scaled logits (the expectation of the mask is the
keep probability, which the 1/q scaling cancels), at rate 1/sqrt(k); ``logit_distance`` shows it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from normdrop.nn.mc import mc_samples
from normdrop.nn.modes import dropouts
from normdrop.probe_catalog import DEFAULT_EVERY, When
from normdrop.probes.base import Probe, Record, measurement_mode, tidy_record
from normdrop.train import HookContext

NAME = "ensemble"
MC_SIZES = (1, 2, 5, 10, 20, 50, 100)
"""Default numbers k of Monte-Carlo passes (the dropout paper's figure 11 goes to about 100)."""
ECE_BINS = 15
"""Equal-width confidence bins of the expected calibration error (Guo et al. 2017 use 15)."""
MC_SEED = 20160606
"""Seed of the MC masks (Gal & Ghahramani 2016, ICML June 2016)."""


@torch.no_grad()
def weight_scaled_logits(model: nn.Module, inputs: Tensor) -> Tensor:
    """The deterministic (eval-mode) logits in float64: dropout off, which for inverted dropout is weight scaling;
    BN on running statistics."""
    with measurement_mode(model, "running", dropout=False):
        return model(inputs).double()


def example_negative_log_likelihood(probabilities: Tensor, labels: Tensor) -> Tensor:
    """-ln p(y_i | x_i) per example, float64 of shape (N,), from predicted probabilities (N, C) (a probability of 0
    counts as the smallest positive float64, so every value stays finite)."""
    picked = probabilities.double().gather(1, labels.long()[:, None]).squeeze(1)
    return -picked.clamp_min(torch.finfo(torch.float64).tiny).log()


def negative_log_likelihood(probabilities: Tensor, labels: Tensor) -> float:
    """-mean_i ln p(y_i | x_i) of predicted probabilities (N, C): the mean of
    :func:`example_negative_log_likelihood`."""
    return float(example_negative_log_likelihood(probabilities, labels).mean())


def expected_calibration_error(probabilities: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    """sum_b (n_b / N) |acc_b - conf_b| over ``bins`` equal-width bins ((b-1)/B, b/B] of the confidence (see the
    module docstring)."""
    if bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins}")
    confidence, predicted = probabilities.double().max(dim=1)
    correct = (predicted == labels.long()).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    hits = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    confidences = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    return float((hits - confidences).abs().sum() / len(labels))


def _scores(
    probabilities: Tensor, labels: Tensor, reference: Tensor | None, ensemble: Tensor | None
) -> dict[str, float | None]:
    """Accuracy, NLL, ECE and agreement of averaged probabilities (N, C) with reference predictions (argmax labels)."""
    predicted = probabilities.argmax(dim=1)
    return {
        "accuracy": float((predicted == labels).double().mean()),
        "nll": negative_log_likelihood(probabilities, labels),
        "ece": expected_calibration_error(probabilities, labels),
        "agreement_weight_scaled": None if reference is None else float((predicted == reference).double().mean()),
        "agreement_ensemble": None if ensemble is None else float((predicted == ensemble).double().mean()),
    }


def _mc_logits(model: nn.Module, inputs: Tensor, k: int, seed: int, reference_logits: Tensor) -> Tensor:
    """(k, N, C) float64 logits of k dropout passes with masks from ``seed`` (every pass the weight-scaled
    ``reference_logits`` for a model without dropout)."""
    if not dropouts(model):
        return reference_logits.expand(k, *reference_logits.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mc_samples(model, inputs, k).double()


def mc_example_nll_gap(model: nn.Module, inputs: Tensor, labels: Tensor, k: int, *, seed: int = MC_SEED) -> Tensor:
    """Per example, -ln p_mc,k(y_i | x_i) minus -ln p_ws(y_i | x_i) (nats, float64, shape (N,)): the MC average of
    k passes against weight scaling, example by example.

    Its mean is the ``nll`` of the ``mc`` row with this k minus that of the ``weight_scaled`` row of
    :func:`mc_dropout_records` called with ``max(ks) == k`` and the same ``seed`` (the same k masks); what a
    bootstrap over test examples resamples.
    """
    if k < 1:
        raise ValueError(f"k must be a positive int, got {k}")
    reference_logits = weight_scaled_logits(model, inputs)
    averaged = _mc_logits(model, inputs, k, seed, reference_logits).softmax(dim=2).cumsum(dim=0)[-1] / k  # as the rows
    mc = example_negative_log_likelihood(averaged, labels)
    return mc - example_negative_log_likelihood(reference_logits.softmax(dim=1), labels)


def mc_dropout_records(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    ks: Sequence[int] = MC_SIZES,
    *,
    seed: int = MC_SEED,
    ensemble_prediction: Tensor | None = None,
    step: int = 0,
) -> list[Record]:
    """Weight scaling (``method="weight_scaled"``, ``k=None``) and MC averages of k passes (``method="mc"``).

    The max(ks) passes are drawn once by ``normdrop.nn.mc.mc_samples`` (dropout sampling, BN on running statistics,
    masks from ``seed``), and the average of the first k is scored for each k in ``ks``. MC rows add
    ``logit_distance`` (mean over examples of the L2 distance between the mean of the k passes' logits and the
    weight-scaled logits) and ``tv_weight_scaled`` (mean total variation distance between the averaged and the
    weight-scaled probabilities). A model without dropout has every pass equal to weight scaling.
    """
    sizes = sorted(set(ks))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"ks must be positive ints, got {list(ks)}")
    reference_logits = weight_scaled_logits(model, inputs)
    reference_probabilities = reference_logits.softmax(dim=1)
    reference = reference_logits.argmax(dim=1)
    records = [
        {
            "method": "weight_scaled",
            "k": None,
            **_scores(reference_probabilities, labels, reference, ensemble_prediction),
            "logit_distance": 0.0,
            "tv_weight_scaled": 0.0,
        }
    ]
    samples = _mc_logits(model, inputs, sizes[-1], seed, reference_logits)
    logit_means = samples.cumsum(dim=0)
    probability_means = samples.softmax(dim=2).cumsum(dim=0)
    for k in sizes:
        averaged = probability_means[k - 1] / k
        records.append(
            {
                "method": "mc",
                "k": k,
                **_scores(averaged, labels, reference, ensemble_prediction),
                "logit_distance": float((logit_means[k - 1] / k - reference_logits).norm(dim=1).mean()),
                "tv_weight_scaled": float(0.5 * (averaged - reference_probabilities).abs().sum(1).mean()),
            }
        )
    return [tidy_record(NAME, step, record) for record in records]


def explicit_ensemble_records(
    models: Sequence[nn.Module],
    inputs: Tensor,
    labels: Tensor,
    *,
    reference: nn.Module | None = None,
    step: int = 0,
) -> list[Record]:
    """The average of the first n of ``models`` (each in eval mode) for n = 1..len(models): ``method="ensemble"``.

    ``reference`` (e.g. the dropout network) gives ``agreement_weight_scaled`` and ``tv_weight_scaled`` against its
    weight-scaled prediction. ``member_agreement`` is the mean pairwise argmax agreement among the n members
    (None for n = 1); ``agreement_ensemble`` compares with the average of all the models.
    """
    if not models:
        raise ValueError("explicit_ensemble_records needs at least one model")
    member_probabilities = [weight_scaled_logits(m, inputs).softmax(dim=1) for m in models]
    member_predictions = [p.argmax(dim=1) for p in member_probabilities]
    full = torch.stack(member_probabilities).mean(dim=0).argmax(dim=1)
    reference_probabilities = None if reference is None else weight_scaled_logits(reference, inputs).softmax(1)
    reference_prediction = None if reference_probabilities is None else reference_probabilities.argmax(dim=1)
    records: list[Record] = []
    agreeing_pairs = 0.0
    for n in range(1, len(models) + 1):
        agreeing_pairs += sum(
            float((member_predictions[n - 1] == member_predictions[j]).double().mean()) for j in range(n - 1)
        )
        averaged = torch.stack(member_probabilities[:n]).mean(dim=0)
        tv = None
        if reference_probabilities is not None:
            tv = float(0.5 * (averaged - reference_probabilities).abs().sum(1).mean())
        records.append(
            {
                "method": "ensemble",
                "k": n,
                **_scores(averaged, labels, reference_prediction, full),
                "member_agreement": agreeing_pairs / math.comb(n, 2) if n > 1 else None,
                "tv_weight_scaled": tv,
            }
        )
    return [tidy_record(NAME, step, record) for record in records]


def ensemble_comparison(
    dropout_model: nn.Module,
    independent_models: Sequence[nn.Module],
    inputs: Tensor,
    labels: Tensor,
    ks: Sequence[int] = MC_SIZES,
    *,
    seed: int = MC_SEED,
    step: int = 0,
) -> list[Record]:
    """All three: weight scaling and MC averages of ``dropout_model``, and the explicit ensemble of
    ``independent_models``, every row with agreement against both weight scaling and the full ensemble."""
    members = [weight_scaled_logits(m, inputs).softmax(dim=1) for m in independent_models]
    ensemble_prediction = torch.stack(members).mean(dim=0).argmax(dim=1) if members else None
    records = mc_dropout_records(
        dropout_model, inputs, labels, ks, seed=seed, ensemble_prediction=ensemble_prediction, step=step
    )
    if independent_models:
        records += explicit_ensemble_records(independent_models, inputs, labels, reference=dropout_model, step=step)
    return records


class EnsembleProbe(Probe):
    """Weight scaling vs MC averages of k passes of the run's own network, on a data split (by default the test
    set, at the end of the run). Records: those of :func:`mc_dropout_records` plus ``split`` and ``examples``.
    The explicit ensemble needs several runs: see :func:`explicit_ensemble_records` / :func:`ensemble_comparison`.
    """

    name = NAME
    needs = frozenset({"model", "dataset"})

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        when: When | None = None,
        *,
        ks: Sequence[int] = MC_SIZES,
        split: Literal["train", "test"] = "test",
        max_examples: int | None = None,
        seed: int = MC_SEED,
    ) -> None:
        super().__init__(every, when)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.ks = tuple(ks)
        self.split = split
        self.max_examples = max_examples
        self.seed = seed

    def measure(self, ctx: HookContext) -> list[Record]:
        data = ctx.dataset
        x, y = (data.x_test, data.y_test) if self.split == "test" else (data.x_train, data.y_train)
        x, y = x[: self.max_examples], y[: self.max_examples]
        records = mc_dropout_records(ctx.model, x, y, self.ks, seed=self.seed, step=ctx.step)
        return [{**record, "split": self.split, "examples": len(y)} for record in records]
