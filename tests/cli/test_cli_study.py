"""`normdrop study` flags: --list-settings, --claims, --settings, --model, --dataset; bad names are one-line errors
naming the valid ones, before any work (no store, no report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normdrop.claims import CLAIM_IDS
from normdrop.claims.setting import SETTINGS
from normdrop.cli import app


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_list_settings_prints_every_setting_and_exits(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["study", "--list-settings", "--store", str(tmp_path / "runs.sqlite")])
    assert result.exit_code == 0, result.output
    for name, definition in SETTINGS.items():
        assert name in result.output and definition.dataset in result.output
    assert "bn-regularizes" in result.output  # the BN-only setting lists its claims
    assert not (tmp_path / "runs.sqlite").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--claims", "bn-faster,no-such-claim"], ["--claims", "no-such-claim", *CLAIM_IDS]),
        (["--settings", "mlp-sgd,nowhere"], ["--settings", "nowhere", *SETTINGS]),
        (["--claims", ","], ["--claims", "bn-faster"]),
        (["--model", "vit"], ["--model", "'vit'", "cnn1d"]),
        (["--dataset", "imagenet"], ["--dataset", "'imagenet'", "digits"]),
        (["--claims", "dropout-overfit", "--settings", "mlp-sgd-he"], ["dropout-overfit", "mlp-sgd-he", "cnn1d"]),
    ],
)
def test_bad_names_fail_in_one_line_before_any_work(
    runner: CliRunner, tmp_path: Path, flags: list[str], expected: list[str]
) -> None:
    store, out = tmp_path / "runs.sqlite", tmp_path / "report"
    result = runner.invoke(app, ["study", *flags, "--store", str(store), "--out", str(out), "-q"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in expected:
        assert word in lines[0]
    assert not store.exists() and not out.exists()


def test_claims_and_settings_choose_what_runs(runner: CliRunner, tmp_path: Path) -> None:
    """A claim measured without training, in two settings with their datasets overridden: the report holds that
    claim only, in those settings, and `normdrop report` re-renders the same ones."""
    out = tmp_path / "report"
    store = str(tmp_path / "runs.sqlite")
    flags = ["--claims", "dropout-mechanics", "--settings", "digits,mlp-sgd", "--quick", "--seeds", "2"]
    overrides = ["--dataset", "blobs", "--model", "cnn1d"]
    result = runner.invoke(app, ["study", *flags, *overrides, "--store", store, "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["study"]["claims"] == ["dropout-mechanics"]
    assert [(s["name"], s["dataset"], s["seeds"], s["overrides"]) for s in summary["study"]["settings"]] == [
        ("digits", "blobs", 2, {"model": "cnn1d"}),
        ("mlp-sgd", "blobs", 2, {"model": "cnn1d"}),
    ]
    (claim,) = summary["claims"]
    # a mechanics claim trains nothing and is measured once, in the first chosen setting (Claim.per_setting)
    assert [row["setting"] for row in claim["settings"]] == ["digits"]
    result = runner.invoke(app, ["report", "--store", store, "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    again = json.loads((out / "summary.json").read_text())
    assert again["study"]["settings"] == summary["study"]["settings"] and again["study"]["trained"] is False
    assert [c["id"] for c in again["claims"]] == ["dropout-mechanics"]
