"""Ensemble probe: MC averaging of a network linear in its dropped units converges to weight scaling as k grows (at
rate 1/sqrt(k)); an explicit ensemble's averages are exact."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import normdrop.nn as nd
from normdrop.data import Dataset
from normdrop.lab import run_spec
from normdrop.nn.mc import mc_samples
from normdrop.probes import EnsembleProbe, ensemble_comparison, explicit_ensemble_records, mc_dropout_records
from normdrop.probes.ensemble import MC_SEED
from normdrop.spec import RunSpec
from normdrop.train import HookContext


def linear_in_dropped_units(seed: int = 0) -> nn.Sequential:
    """logits = W dropout(x) + b: linear in the dropped units, so E over masks of the logits is the eval logits."""
    torch.manual_seed(seed)
    return nn.Sequential(nd.Dropout(0.5), nn.Linear(8, 3))


def separable_data(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    centres = 3 * torch.randn(3, 8, generator=generator)
    return centres[labels] + 0.5 * torch.randn(n, 8, generator=generator), labels


def test_mc_average_of_logits_converges_to_weight_scaling_at_rate_one_over_sqrt_k() -> None:
    x, y = separable_data()
    ks = (1, 4, 16, 64, 256)
    records = mc_dropout_records(linear_in_dropped_units(), x, y, ks)
    weight_scaled, mc = records[0], records[1:]
    assert weight_scaled["method"] == "weight_scaled" and weight_scaled["k"] is None
    assert [r["k"] for r in mc] == list(ks)
    distances = [r["logit_distance"] for r in mc]
    assert all(a > b for a, b in itertools.pairwise(distances))
    # E||mean of k iid zero-mean vectors|| scales as 1/sqrt(k): a factor 2 per 4x more passes, up to sampling noise
    for a, b in itertools.pairwise(distances):
        assert a / b == pytest.approx(2.0, rel=0.15)
    assert distances[-1] < distances[0] / 10
    # Probabilities are not linear in the units, so their average need not reach weight scaling (Jensen), but
    # averaging more passes brings the predictions closer to it.
    assert mc[-1]["agreement_weight_scaled"] > mc[0]["agreement_weight_scaled"]
    assert mc[-1]["tv_weight_scaled"] < mc[0]["tv_weight_scaled"]


def test_mc_records_score_accuracy_and_nll_from_the_averaged_probabilities() -> None:
    x, y = separable_data(200)
    model = linear_in_dropped_units()
    records = mc_dropout_records(model, x, y, ks=(1, 3))
    torch.manual_seed(99)  # the probe's masks must come from its own seed, not from the caller's RNG
    again = mc_dropout_records(model, x, y, ks=(1, 3))
    assert records == again
    with torch.random.fork_rng():
        torch.manual_seed(MC_SEED)
        probabilities = mc_samples(model, x, 3).double().softmax(dim=2).mean(dim=0)
    assert records[2]["accuracy"] == pytest.approx(float((probabilities.argmax(1) == y).double().mean()))
    nll = float(-probabilities.gather(1, y[:, None]).log().mean())
    assert records[2]["nll"] == pytest.approx(nll, rel=1e-9)
    first_only = mc_dropout_records(model, x, y, ks=(1,))
    assert first_only[1] == records[1], "the average of the first k passes does not depend on the other ks"
    assert model.training, "the model's mode is restored"


def test_without_dropout_every_mc_average_is_weight_scaling() -> None:
    x, y = separable_data(100)
    model = nn.Sequential(nn.Linear(8, 3))
    records = mc_dropout_records(model, x, y, ks=(1, 5))
    assert [(record["method"], record["k"]) for record in records] == [("weight_scaled", None), ("mc", 1), ("mc", 5)]
    for record in records[1:]:
        assert record["logit_distance"] == pytest.approx(0.0, abs=1e-12)
        assert record["agreement_weight_scaled"] == 1.0 and record["tv_weight_scaled"] == pytest.approx(0.0, abs=1e-12)


class Constant(nn.Module):
    """A classifier that outputs the same logits for every input."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def test_explicit_ensemble_averages_are_exact() -> None:
    x = torch.zeros(4, 2)
    y = torch.tensor([0, 0, 1, 1])
    members = [Constant([2.0, 0.0]), Constant([0.0, 1.0]), Constant([0.0, 3.0])]
    records = explicit_ensemble_records(members, x, y, reference=Constant([1.0, 0.0]), step=12)
    assert [r["k"] for r in records] == [1, 2, 3] and {r["method"] for r in records} == {"ensemble"}
    p = [torch.tensor(m).softmax(0) for m in ([2.0, 0.0], [0.0, 1.0], [0.0, 3.0])]
    for n, record in enumerate(records, start=1):
        averaged = sum(p[:n]) / n
        predicted = int(averaged.argmax())
        assert record["accuracy"] == pytest.approx(0.5)  # a constant prediction is right on half the examples
        nll = -0.5 * (math.log(averaged[0]) + math.log(averaged[1]))
        assert record["nll"] == pytest.approx(nll, rel=1e-6)
        assert record["agreement_weight_scaled"] == (1.0 if predicted == 0 else 0.0)
        assert record["step"] == 12 and record["probe"] == "ensemble"
    assert records[0]["member_agreement"] is None
    assert records[1]["member_agreement"] == 0.0  # class 0 vs class 1
    assert records[2]["member_agreement"] == pytest.approx(1 / 3)  # one agreeing pair of three
    assert records[2]["agreement_ensemble"] == 1.0


def test_comparison_puts_all_three_methods_side_by_side() -> None:
    x, y = separable_data(200)
    independent = [linear_in_dropped_units(seed) for seed in (1, 2, 3)]
    records = ensemble_comparison(linear_in_dropped_units(), independent, x, y, ks=(1, 10))
    assert [(r["method"], r["k"]) for r in records] == [
        ("weight_scaled", None),
        ("mc", 1),
        ("mc", 10),
        ("ensemble", 1),
        ("ensemble", 2),
        ("ensemble", 3),
    ]
    assert all(r["agreement_ensemble"] is not None and r["agreement_weight_scaled"] is not None for r in records)


def test_probe_runs_at_the_end_of_a_run_on_the_test_set() -> None:
    probe = EnsembleProbe(ks=(1, 2))
    assert probe.every == 0 and probe.when == "end"
    spec = RunSpec(dataset="blobs", width=16, dropout=0.3, steps=20, eval_every=20, probes=("ensemble",))
    result = run_spec(spec)
    assert result.status == "finished"
    assert {r["step"] for r in result.probe_records} == {20}
    assert [r["k"] for r in result.probe_records] == [None, 1, 2, 5, 10, 20, 50, 100]
    assert all(r["split"] == "test" and r["examples"] == 1000 for r in result.probe_records)


def test_probe_on_a_given_context_uses_the_chosen_split() -> None:
    x, y = separable_data(50)
    data = Dataset("toy", x, y, x[:10], y[:10], 3, (8,), "toy")
    model = linear_in_dropped_units()
    ctx = HookContext(RunSpec(), 9, 0.1, model, torch.optim.SGD(model.parameters()), None, (x, y), data)  # type: ignore[arg-type]
    records = EnsembleProbe(ks=(2,), split="train", max_examples=30)(ctx)
    assert [r["examples"] for r in records] == [30, 30] and records[0]["split"] == "train"
    with pytest.raises(ValueError, match="split"):
        EnsembleProbe(split="validation")  # type: ignore[arg-type]
