"""normdrop's Lightning callbacks with a real ``lightning`` Trainer on CPU."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

import normdrop.nn as nd  # noqa: E402
from normdrop.integrations.lightning import FreezeBN, MCDropoutPrediction, PreciseBN, ProbeCallback  # noqa: E402
from normdrop.nn.mc import mc_predict  # noqa: E402
from normdrop.probes import make_probe  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), nd.BatchNorm1d(16), torch.nn.ReLU(), nd.Dropout(0.3), torch.nn.Linear(16, 3)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g) * 2 + 1
    y = torch.randint(0, 3, (64,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def trainer(callbacks, epochs: int = 2) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        deterministic=True,
    )


def fit(callbacks, epochs: int = 2) -> Classifier:
    model = Classifier()
    torch.manual_seed(2)
    trainer(callbacks, epochs).fit(model, data())
    return model


def test_precise_bn_sets_population_statistics():
    model = fit([PreciseBN()])
    with torch.no_grad():
        features = torch.cat([model.net[0](x) for x, _ in data()])
    bn = model.net[1]
    torch.testing.assert_close(bn.running_mean, features.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, features.var(0, unbiased=True), atol=1e-5, rtol=1e-5)
    plain = fit([])
    assert not torch.allclose(plain.net[1].running_mean, features.mean(0), atol=1e-3)  # the callback did it


@pytest.mark.parametrize("affine", [False, True])
def test_freeze_bn_survives_train_and_keeps_affine_when_asked(affine):
    initial = Classifier()
    model = fit([FreezeBN(affine=affine)])
    bn, bn0 = model.net[1], initial.net[1]
    assert not bn.training  # after Lightning's .train() calls
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(bn0, name)), name
    assert torch.equal(bn.weight, bn0.weight) == affine
    assert not torch.equal(model.net[0].weight, initial.net[0].weight)
    with pytest.raises(ValueError, match="not batch norm"):
        FreezeBN(modules=["net.0"]).frozen(model)


def test_mc_dropout_prediction_matches_mc_predict():
    model = fit([], epochs=1)
    callback = MCDropoutPrediction(k=8)
    loader = data()
    torch.manual_seed(5)
    deterministic = trainer([callback]).predict(model, loader)
    torch.manual_seed(5)
    expected = [mc_predict(model, x, k=8) for x, _ in loader]
    assert len(callback.predictions) == len(expected)
    for got, want in zip(callback.predictions, expected, strict=True):
        torch.testing.assert_close(got.mean, want.mean)
        torch.testing.assert_close(got.mutual_information, want.mutual_information)
        assert (got.mutual_information > 0).any()
    assert [tuple(out.shape) for out in deterministic] == [(16, 3)] * 4  # the plain predict_step still ran
    with pytest.raises(ValueError, match="k must be"):
        MCDropoutPrediction(k=0)


def test_probe_callback_records_and_leaves_training_unchanged():
    x, y = next(iter(data()))
    probe = make_probe("layer_inputs", every=2)
    callback = ProbeCallback(probe, (x, y))
    probed = fit([callback])
    plain = fit([])
    for a, b in zip(probed.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # observing only: the same training
    steps = sorted({record["step"] for record in callback.records})
    assert steps == [2, 4, 6, 8]  # 4 batches x 2 epochs, every 2 optimizer steps
    assert all(record["probe"] == "layer_inputs" for record in callback.records)
    # a probe's measurement on the model state at that step: the first call, redone on a model trained 2 steps
    replay = Classifier()
    torch.manual_seed(2)
    pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(replay, data())
    again = ProbeCallback(make_probe("layer_inputs", every=2), (x, y)).run(
        replay, torch.optim.SGD(replay.parameters(), lr=0.1), 2
    )
    first = [r for r in callback.records if r["step"] == 2]
    assert again == first


def test_probe_callback_refuses_a_probe_that_needs_the_lab():
    x, y = next(iter(data()))
    with pytest.raises(ValueError, match="dataset"):
        ProbeCallback(make_probe("generalization"), (x, y), every_n_steps=1)


def test_freeze_and_precise_bn_on_a_copy_are_independent():
    model = Classifier()
    clone = copy.deepcopy(model)
    FreezeBN()._freeze(clone)
    assert model.net[1].training and not clone.net[1].training
