"""make_norm / make_dropout: every registered name builds the right class for each dims, layers run on inputs of
that rank, and unknown names, dims and sources raise ValueErrors that list the options."""

from __future__ import annotations

import pytest
import torch

import normdrop.nn as nd
from normdrop.layer_catalog import NORM_KINDS
from normdrop.nn import factory

NORM_CASES = [  # (name, dims, kwargs, expected class)
    ("batch", 0, {}, nd.BatchNorm1d),
    ("batch", 1, {}, nd.BatchNorm1d),
    ("batch", 2, {"momentum": None}, nd.BatchNorm2d),
    ("batch", 3, {}, nd.BatchNorm3d),
    ("ghost", 1, {"ghost_batch_size": 2}, nd.GhostBatchNorm1d),
    ("ghost", 2, {"ghost_batch_size": 2}, nd.GhostBatchNorm2d),
    ("renorm", 1, {"r_max": 2.0}, nd.BatchRenorm1d),
    ("renorm", 2, {}, nd.BatchRenorm2d),
    ("sync", 1, {}, nd.SyncBatchNorm),
    ("sync", 2, {}, nd.SyncBatchNorm),
    ("noisy", 1, {"noise": 0.5}, nd.NoisyBatchNorm1d),
    ("noisy", 2, {}, nd.NoisyBatchNorm2d),
    ("frozen", 1, {"eps": 1e-3}, nd.FrozenBatchNorm1d),
    ("frozen", 2, {}, nd.FrozenBatchNorm2d),
    ("none", 2, {}, torch.nn.Identity),
]
DROPOUT_CASES = [
    ("standard", 0, {}, nd.Dropout),
    ("channel", 0, {}, nd.Dropout),
    ("channel", 1, {}, nd.Dropout1d),
    ("channel", 2, {}, nd.Dropout2d),
    ("alpha", 1, {}, nd.AlphaDropout),
    ("feature_alpha", 2, {}, nd.FeatureAlphaDropout),
    ("gaussian", 2, {}, nd.GaussianDropout),
    ("droppath", 2, {}, nd.DropPath),
    ("dropblock", 2, {"block_size": 3}, nd.DropBlock2d),
    ("uout", 1, {}, nd.Uout),
    ("concrete", 0, {}, nd.ConcreteDropout),
    ("none", 0, {}, torch.nn.Identity),
]
SHAPES = {0: (8, 4), 1: (8, 4, 6), 2: (8, 4, 6, 6), 3: (8, 4, 3, 3, 3)}


def test_every_registered_name_has_a_case():
    assert {case[0] for case in NORM_CASES} == set(nd.norm_names())
    assert {case[0] for case in DROPOUT_CASES} == set(nd.dropout_names())
    assert {"batch", "ghost", "renorm", "sync", "frozen", "none"} <= set(nd.norm_names())


@pytest.mark.parametrize(("name", "dims", "kwargs", "cls"), NORM_CASES)
def test_make_norm_builds_and_runs(name, dims, kwargs, cls):
    layer = nd.make_norm(name, 4, dims, **kwargs)
    assert type(layer) is cls
    for key, value in kwargs.items():
        assert getattr(layer, key) == value
    x = torch.randn(SHAPES[dims])
    assert layer(x).shape == x.shape


@pytest.mark.parametrize(("name", "dims", "kwargs", "cls"), DROPOUT_CASES)
def test_make_dropout_builds_and_runs(name, dims, kwargs, cls):
    layer = nd.make_dropout(name, 0.3, dims, **kwargs)
    assert type(layer) is cls
    rate = getattr(layer, "p", getattr(layer, "beta", None))
    if name == "concrete":
        rate = layer.p.item()
    assert name == "none" or rate == pytest.approx(0.3)
    x = torch.randn(SHAPES[dims])
    assert layer(x).shape == x.shape


def test_torch_layers_where_torch_has_them():
    assert type(nd.make_norm("batch", 3, 2, layers="torch")) is torch.nn.BatchNorm2d
    assert type(nd.make_dropout("channel", 0.2, 1, layers="torch")) is torch.nn.Dropout1d
    with pytest.raises(ValueError, match="norm 'ghost' has no torch implementation; it exists in: normdrop"):
        nd.make_norm("ghost", 3, layers="torch", ghost_batch_size=2)
    with pytest.raises(ValueError, match="layers must be one of normdrop, torch, got 'jax'"):
        nd.make_norm("batch", 3, layers="jax")


def test_unknown_names_and_dims_list_the_options():
    with pytest.raises(
        ValueError, match="unknown norm 'layer'; known norms: batch, ghost, noisy, renorm, sync, frozen, none"
    ):
        nd.make_norm("layer", 4)
    with pytest.raises(ValueError, match="unknown dropout 'spatial'; known dropouts: standard, channel, alpha"):
        nd.make_dropout("spatial", 0.1)
    with pytest.raises(ValueError, match=r"dropout 'dropblock' supports dims 2 \(spatial dims of the input\), got 1"):
        nd.make_dropout("dropblock", 0.1, 1, block_size=3)
    with pytest.raises(ValueError, match=r"norm 'ghost' supports dims 0, 1, 2 .*got 3"):
        nd.make_norm("ghost", 4, 3, ghost_batch_size=2)
    with pytest.raises(ValueError, match="num_features must be a positive int, got 0"):
        nd.make_norm("batch", 0)


def test_register_adds_a_name_once():
    try:
        factory.register_norm("instance", {1: torch.nn.InstanceNorm1d, 2: torch.nn.InstanceNorm2d})
        assert "instance" in nd.norm_names()
        assert isinstance(nd.make_norm("instance", 3, 2), torch.nn.InstanceNorm2d)
        with pytest.raises(ValueError, match="norm 'instance' is already registered"):
            factory.register_norm("instance", {1: torch.nn.InstanceNorm1d})
        with pytest.raises(ValueError, match="builders must map dims"):
            factory.register_dropout("odd", {5: torch.nn.Dropout})
    finally:
        factory._NORMS.pop("instance", None)
        NORM_KINDS.pop("instance", None)  # the torch-free catalog that specs are validated against
