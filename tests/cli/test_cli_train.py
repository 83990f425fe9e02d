"""`normdrop train`: flags mirror the spec, --json prints one object, bad values exit 2 naming the flag."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from normdrop.cli import app
from normdrop.spec import RunSpec
from normdrop.train import run

FAST_FLAGS = ["--dataset", "blobs", "--width", "16", "--batch-size", "50", "--steps", "30", "--eval-every", "10"]


def invoke(*flags: str):
    return CliRunner().invoke(app, ["train", *flags])


def test_json_prints_one_object_with_the_final_metrics() -> None:
    outcome = invoke(*FAST_FLAGS, "--norm", "batch", "--dropout", "0.3", "--seed", "3", "--json")
    assert outcome.exit_code == 0, outcome.output
    printed = json.loads(outcome.stdout)
    spec = RunSpec(dataset="blobs", width=16, batch_size=50, steps=30, eval_every=10, norm="batch", dropout=0.3, seed=3)
    expected = run(spec)
    assert printed["run_id"] == spec.run_id and printed["status"] == "finished"
    assert printed["diverged"] is False and printed["diverged_step"] is None
    for name in ("test_accuracy", "train_accuracy", "test_loss", "train_loss"):
        assert printed[name] == expected.summary[name], name
    assert RunSpec.model_validate(printed["spec"]) == spec


def test_every_spec_field_has_a_flag() -> None:
    outcome = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert outcome.exit_code == 0
    for name in RunSpec.model_fields:
        assert "--" + name.replace("_", "-") in outcome.output, name


def test_flags_reach_the_spec() -> None:
    outcome = invoke(
        *FAST_FLAGS,
        "--optimizer",
        "sgd",
        "--momentum",
        "0.9",
        "--nesterov",
        "--no-standardize",
        "--norm-momentum",
        "none",
        "--dataset-options",
        "noise=0.3,n_classes=3",
        "--schedule",
        "cosine",
        "--json",
    )
    assert outcome.exit_code == 0, outcome.output
    spec = RunSpec.model_validate(json.loads(outcome.stdout)["spec"])
    assert (spec.optimizer, spec.momentum, spec.nesterov, spec.standardize, spec.norm_momentum) == (
        "sgd",
        0.9,
        True,
        False,
        None,
    )
    assert spec.dataset_options == (("n_classes", 3), ("noise", 0.3))
    assert spec.schedule == "cosine"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--lr", "-1"], "--lr='-1'"),
        (["--lr", "fast"], "--lr='fast'"),
        (["--model", "transformer"], "--model='transformer'"),
        (["--norm", "layer"], "unknown norm 'layer'"),
        (["--dropout", "1.5"], "--dropout='1.5'"),
        (["--steps", "2.5"], "--steps='2.5'"),
        (["--dataset-options", "noise"], "--dataset-options 'noise'"),
        (["--probes", "Not A Name"], "lower_snake_case"),
        (["--nesterov"], "nesterov=True needs optimizer='sgd'"),
    ],
)
def test_a_bad_value_exits_2_naming_the_flag_and_value(flags: list[str], expected: str) -> None:
    outcome = invoke(*FAST_FLAGS, *flags, "--json")
    assert outcome.exit_code == 2
    assert expected in outcome.stderr
    assert outcome.stdout == ""
    assert "Traceback" not in outcome.output


def test_every_bad_value_is_reported_at_once() -> None:
    outcome = invoke("--lr", "0", "--batch-size", "-3")
    assert outcome.exit_code == 2
    assert "--lr='0'" in outcome.stderr and "--batch-size='-3'" in outcome.stderr


def test_a_diverged_run_is_a_result_not_an_error() -> None:
    outcome = invoke(*FAST_FLAGS, "--optimizer", "sgd", "--lr", "1e4", "--steps", "200", "--json")
    assert outcome.exit_code == 0, outcome.output
    printed = json.loads(outcome.stdout)
    assert printed["status"] == "diverged" and printed["diverged"] is True
    assert isinstance(printed["diverged_step"], int) and printed["test_accuracy"] is None


def test_a_failed_run_exits_1_with_its_error() -> None:
    outcome = invoke(*FAST_FLAGS, "--batch-size", "5000", "--quiet")
    assert outcome.exit_code == 1
    assert "batch_size=5000 exceeds" in outcome.stderr


def test_quiet_prints_nothing_and_the_default_is_a_table() -> None:
    quiet = invoke(*FAST_FLAGS, "--quiet")
    assert quiet.exit_code == 0 and quiet.output == ""
    table = invoke(*FAST_FLAGS)
    assert table.exit_code == 0
    assert "test_accuracy" in table.stdout and "finished" in table.stdout
