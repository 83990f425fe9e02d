"""The torch-free catalogs that specs are validated against: equal to what normdrop.nn.factory and normdrop.data
build, and sound: whatever the catalog vouches for without building the layer, the layer accepts; and a spec's
error message is the same whether or not the catalog decided."""

from __future__ import annotations

import inspect
import itertools
import re

import pytest
from pydantic import ValidationError

import normdrop.spec as spec_module
from normdrop import data, dataset_catalog, layer_catalog
from normdrop.layer_catalog import DROPOUT_KINDS, NORM_KINDS, surely_accepted
from normdrop.nn import dropout_variants, factory
from normdrop.spec import RunSpec

REGISTRIES = {"norm": (NORM_KINDS, factory._NORMS), "dropout": (DROPOUT_KINDS, factory._DROPOUTS)}

SUPPLIED_BY_THE_SPEC = {"self", "num_features", "eps", "momentum", "p", "beta", "init_p"}
"""Constructor parameters a spec fills from its own fields (``norm_eps``, ``norm_momentum``, ``dropout``)."""
NOT_NUMBERS = {"device", "dtype", "generator", "process_group", "layer"}
"""Constructor parameters that take objects, which an option (an int or float) cannot be: left to the layer."""
WRAPPERS = {factory._uout: dropout_variants.Uout, factory._concrete: dropout_variants.ConcreteDropout}


def constructors(what: str, name: str):
    """(source, dims, the class or function that builds the layer) for every entry of the factory's registry."""
    _, registry = REGISTRIES[what]
    for source, by_dims in registry[name].items():
        for dims, builder in by_dims.items():
            if builder is not factory._identity:
                yield source, dims, WRAPPERS.get(builder, builder)


@pytest.mark.parametrize("what", list(REGISTRIES))
def test_kinds_sources_and_dims_are_the_factorys(what):
    catalog, registry = REGISTRIES[what]
    assert list(catalog) == list(registry)
    for name, kind in catalog.items():
        assert set(kind.sources) == set(registry[name]), name
        for source, dims in kind.sources.items():
            assert sorted(dims) == sorted(registry[name][source]), (name, source)


def test_names_are_the_builders():
    assert tuple(factory.ACTIVATIONS) == layer_catalog.ACTIVATION_NAMES
    assert layer_catalog.LAYER_SOURCES == factory.LAYER_SOURCES
    assert layer_catalog.ALL_DIMS == factory.DIMS
    assert factory.norm_names() == tuple(NORM_KINDS) and factory.dropout_names() == tuple(DROPOUT_KINDS)
    assert data.DATASET_NAMES is dataset_catalog.DATASET_NAMES
    assert tuple(data._BUILDERS) == dataset_catalog.DATASET_NAMES
    assert data.check_dataset_options is dataset_catalog.check_dataset_options


@pytest.mark.parametrize(("what", "name"), [(w, n) for w, (c, _) in REGISTRIES.items() for n in c if n != "none"])
def test_options_are_the_constructors_parameters(what, name):
    kind = REGISTRIES[what][0][name]
    for source, dims, builder in constructors(what, name):
        parameters = inspect.signature(builder).parameters
        options = set(parameters) - SUPPLIED_BY_THE_SPEC - NOT_NUMBERS
        listed = set(kind.options) - NOT_NUMBERS
        assert listed == options, (name, source, dims)
        required = {n for n, p in parameters.items() if p.default is inspect.Parameter.empty} - SUPPLIED_BY_THE_SPEC
        assert set(kind.required) == required, (name, source, dims)
        for option, default in kind.defaults.items():
            assert parameters[option].default == default, (name, option)
        assert kind.takes_momentum == ("momentum" in parameters or what == "dropout"), name


EDGE_VALUES = (-1, 0, 1, 2, 7, 0.5, 1.0, 1.5, 1e-300, 1e9, -1e-300, True, False)
"""Option values on and around every rule's boundary (bools are ints to Python but not to the layers)."""


def option_samples(kind: layer_catalog.LayerKind) -> list[dict]:
    samples: list[dict] = [{}]
    ruled = [name for name, rule in kind.options.items() if rule is not None]
    for name in ruled:
        samples += [{name: value} for value in EDGE_VALUES]
    for first, second in itertools.combinations(ruled, 2):  # pairs: cross-option rules (renorm's schedule)
        samples += [{first: a, second: b} for a in (0, 1, 3, 5_000) for b in (0, 2, 5_000, 40_000)]
    for required in kind.required:  # with each sample, the required options given a value the rule accepts
        samples = [{required: 4, **sample} for sample in samples]
    return samples


@pytest.mark.parametrize("name", [n for n in NORM_KINDS if n != "none"])
def test_every_norm_the_catalog_vouches_for_builds(name):
    kind = NORM_KINDS[name]
    vouched = 0
    for source, dims in itertools.product(layer_catalog.LAYER_SOURCES, layer_catalog.ALL_DIMS):
        for options in option_samples(kind):
            if not surely_accepted(kind, source, dims, options):
                continue
            # the extremes of RunSpec.norm_momentum (0, 1] or None and norm_eps > 0
            for momentum, eps in itertools.product((None, 1e-12, 1.0), (1e-300, 1e-5, 1e6)):
                defaults = factory.norm_defaults(name, momentum=momentum, eps=eps)
                factory.make_norm(name, 1, dims, layers=source, **{**defaults, **options})
                vouched += 1
    assert vouched > 0


@pytest.mark.parametrize("name", [n for n in DROPOUT_KINDS if n != "none"])
def test_every_dropout_the_catalog_vouches_for_builds(name):
    kind = DROPOUT_KINDS[name]
    vouched = 0
    for source, dims in itertools.product(layer_catalog.LAYER_SOURCES, layer_catalog.ALL_DIMS):
        for options in option_samples(kind):
            if not surely_accepted(kind, source, dims, options):
                continue
            for rate in (1e-12, 0.5, 1 - 1e-12):  # RunSpec.dropout in [0, 1), 0 checked as 0.5
                factory.make_dropout(name, rate, dims, layers=source, **options)
                vouched += 1
    assert vouched > 0


def test_the_rules_reject_what_the_layers_reject():
    # Not needed for soundness (the test above), but the catalog must be no looser: spot checks of each rule.
    ghost, renorm = NORM_KINDS["ghost"], NORM_KINDS["renorm"]
    assert not surely_accepted(ghost, "normdrop", 1, {})  # required
    assert not surely_accepted(ghost, "normdrop", 1, {"ghost_batch_size": 0})
    assert not surely_accepted(ghost, "normdrop", 1, {"ghost_batch_size": True})
    assert not surely_accepted(ghost, "torch", 1, {"ghost_batch_size": 4})  # no torch.nn ghost BN
    assert not surely_accepted(ghost, "normdrop", 3, {"ghost_batch_size": 4})  # no 3-d ghost BN
    assert surely_accepted(ghost, "normdrop", 2, {"ghost_batch_size": 4})
    assert not surely_accepted(renorm, "normdrop", 1, {"r_max": 0.5})
    assert not surely_accepted(renorm, "normdrop", 1, {"r_max_steps": 10})  # before the default warmup of 5000
    assert surely_accepted(renorm, "normdrop", 1, {"warmup_steps": 0, "r_max_steps": 10})
    assert not surely_accepted(NORM_KINDS["batch"], "normdrop", 1, {"affine": 0})  # the layer decides
    assert not surely_accepted(NORM_KINDS["batch"], "normdrop", 1, {"momentum": 0.3})  # not an option
    assert not surely_accepted(DROPOUT_KINDS["dropblock"], "normdrop", 0, {"block_size": 3})
    assert not surely_accepted(DROPOUT_KINDS["standard"], "normdrop", 0, {"inplace": 1})
    assert not surely_accepted(None, "normdrop", 0, {})


BAD_SPECS = [
    {"norm": "ghost"},
    {"norm": "ghost", "norm_options": {"ghost_batch_size": 0}},
    {"norm": "ghost", "norm_options": {"ghost_batch_size": 2.5}},
    {"norm": "ghost", "layers": "torch", "norm_options": {"ghost_batch_size": 4}},
    {"norm": "renorm", "norm_options": {"r_max": 0.5}},
    {"norm": "renorm", "norm_options": {"r_max_steps": 10}},
    {"norm": "renorm", "layers": "torch"},
    {"norm": "frozen", "norm_options": {"momentum": 0.1}},
    {"norm": "batch", "norm_options": {"colour": 1}},
    {"norm": "none", "norm_options": {"ghost_batch_size": 4}},
    {"dropout": 0.1, "dropout_kind": "dropblock"},
    {"dropout": 0.1, "dropout_kind": "dropblock", "model": "cnn2d", "dropout_options": {"block_size": 0}},
    {"dropout": 0.1, "dropout_kind": "gaussian", "layers": "torch"},
    {"dropout": 0.1, "dropout_kind": "concrete", "dropout_options": {"temperature": 0.0}},
    {"dropout": 0.1, "dropout_kind": "uout", "dropout_options": {"beta": 0.2}},
    {"dropout_kind": "none", "dropout_options": {"block_size": 3}},
]
GOOD_SPECS = [
    {"norm": "ghost", "norm_options": {"ghost_batch_size": 8}, "norm_momentum": None},
    {"norm": "renorm", "norm_options": {"r_max": 1.0, "d_max": 0, "warmup_steps": 0, "r_max_steps": 0}},
    {"norm": "frozen", "model": "cnn1d"},
    {"norm": "sync", "layers": "torch", "dropout": 0.2, "dropout_kind": "alpha"},
    {"norm": "batch", "norm_options": {"affine": 0}},  # decided by building the layer
    {"model": "cnn2d", "dropout": 0.2, "dropout_kind": "dropblock", "dropout_options": {"block_size": 3}},
    {"dropout": 0.0, "dropout_kind": "concrete", "dropout_options": {"temperature": 0.5}},
]


def _outcome(fields: dict) -> str:
    try:
        RunSpec(**fields)
    except ValidationError as error:
        return str(error)
    return "valid"


@pytest.mark.parametrize("fields", BAD_SPECS + GOOD_SPECS)
def test_messages_are_the_layers_own_whether_or_not_the_catalog_decides(fields, monkeypatch):
    with_catalog = _outcome(fields)
    assert (with_catalog == "valid") == (fields in GOOD_SPECS), with_catalog
    monkeypatch.setattr(spec_module, "surely_accepted", lambda *args: False)  # always build, as before the catalog
    assert _outcome(fields) == with_catalog


def test_a_kind_registered_at_run_time_is_known_to_specs_and_checked_by_building():
    import torch

    try:
        factory.register_norm("instance", {0: torch.nn.InstanceNorm1d, 1: torch.nn.InstanceNorm1d})
        assert RunSpec(norm="instance").norm == "instance"
        assert not surely_accepted(NORM_KINDS["instance"], "normdrop", 0, {})
        message = re.escape("norm='instance' with norm_options={'ghost_batch_size': 2}")
        with pytest.raises(ValidationError, match=message):
            RunSpec(norm="instance", norm_options={"ghost_batch_size": 2})
        with pytest.raises(ValidationError, match="norm 'instance' supports dims 0, 1"):
            RunSpec(norm="instance", model="cnn2d")
    finally:
        factory._NORMS.pop("instance", None)
        NORM_KINDS.pop("instance", None)
    with pytest.raises(ValidationError, match="unknown norm 'instance'"):
        RunSpec(norm="instance")
