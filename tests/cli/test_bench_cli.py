"""``normdrop bench``: the command runs end to end and its JSON has the promised structure with sane values.

Speeds are never asserted (the machine is shared and the run is short); only that every timing and ratio is a
positive finite number, that the bytes kept for backward are what the layers keep, and that the goals are derived.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from typer.testing import CliRunner

from normdrop.bench import layers as bench_layers
from normdrop.bench import models as bench_models
from normdrop.cli import app

# One thread and one round per case: the shortest run that still measures every case.
QUICK_FLAGS = ["bench", "--quick", "--threads", "1", "--repeats", "1"]


def positive_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    outcome = CliRunner().invoke(app, [*QUICK_FLAGS, "--json"])
    assert outcome.exit_code == 0, outcome.output
    return json.loads(outcome.stdout)


def test_json_has_every_section(report: dict[str, Any]) -> None:
    assert set(report) == {"environment", "machine", "layers", "lab", "goals"}
    env = report["environment"]
    assert env["quick"] is True and env["repeats"] == 1 and env["clock"] == "wall"
    assert {"torch", "numba", "normdrop", "backend", "fastpath", "cores", "date"} <= set(env)
    assert env["fastpath"] is True  # make test builds it


def test_layer_rows_cover_every_shape_and_op_with_positive_finite_numbers(report: dict[str, Any]) -> None:
    rows = report["layers"]
    measured = {(row["shape_name"], row["op"]) for row in rows}
    assert measured == {(shape, op.name) for shape in bench_layers.QUICK_SHAPES for op in bench_layers.OPS}
    for row in rows:
        assert row["threads"] == 1
        assert list(bench_layers.QUICK_SHAPES[row["shape_name"]]) == row["shape"]
        for key in ("normdrop_seconds", "torch_seconds", "copy_seconds", "speedup", "copy_gb_per_s"):
            assert positive_finite(row[key]), (key, row)
        assert row["speedup"] == pytest.approx(row["torch_seconds"] / row["normdrop_seconds"])
        if row["floor_passes"]:
            assert positive_finite(row["normdrop_floor_percent"]) and positive_finite(row["torch_floor_percent"])
        else:
            assert row["normdrop_floor_percent"] is None and row["torch_floor_percent"] is None


def test_bytes_kept_for_backward(report: dict[str, Any]) -> None:
    backward_rows = [row for row in report["layers"] if row["op"].endswith("fwd+bwd")]
    assert backward_rows
    for row in backward_rows:
        nd_beyond = row["normdrop_saved_beyond_input_bytes_per_element"]
        torch_beyond = row["torch_saved_beyond_input_bytes_per_element"]
        if row["op"].startswith("dropout"):
            # normdrop keeps at most its 16-byte (seed, offset) tensor (the C++ fast path keeps the key as plain
            # integers, no tensor at all); torch.nn.Dropout keeps a float mask.
            assert 0 <= nd_beyond <= 16 / math.prod(row["shape"])
            assert torch_beyond >= 1.0
        else:
            # Both batch norms keep the input (4 bytes per float32 element) and a few per-channel vectors.
            assert row["normdrop_saved_bytes_per_element"] >= 4.0 and row["torch_saved_bytes_per_element"] >= 4.0
            assert nd_beyond < 1.0 and torch_beyond < 1.0
    for row in report["layers"]:
        if not row["op"].endswith("fwd+bwd"):
            assert row["normdrop_saved_bytes_per_element"] is None


def test_lab_rows_and_matmul_peak(report: dict[str, Any]) -> None:
    (peak,) = report["machine"]
    assert peak["threads"] == 1 and peak["matmul_size"] == bench_models.QUICK_MATMUL_SIZE
    assert positive_finite(peak["matmul_gflop_per_s"])
    assert {row["model"] for row in report["lab"]} == set(bench_models.LAB_MODELS)
    for row in report["lab"]:
        for key in (
            "model_flops_per_step",
            "normdrop_steps_per_s",
            "torch_steps_per_s",
            "speedup",
            "normdrop_mfu_percent",
            "torch_mfu_percent",
        ):
            assert positive_finite(row[key]), (key, row)


def test_goals_are_derived_from_the_rows(report: dict[str, Any]) -> None:
    goals = report["goals"]
    assert len(goals) == len(bench_layers.GOALS) + 1
    for goal in goals[:-1]:  # speed-ups
        assert isinstance(goal["met"], bool) and goal["bound"] == ">="
        assert positive_finite(goal["measured"])
        assert goal["met"] == (goal["measured"] >= goal["target"])
    # Dropout keeps (almost) no bytes per element: a property, not a speed; 0 on the fast path (no tensor at all).
    kept = goals[-1]
    assert kept["bound"] == "<" and math.isfinite(kept["measured"]) and kept["measured"] >= 0 and kept["met"]


def test_tables_without_the_lab() -> None:
    outcome = CliRunner().invoke(app, [*QUICK_FLAGS, "--no-lab", "--quiet"], env={"COLUMNS": "200"})
    assert outcome.exit_code == 0, outcome.output
    assert "speedup" in outcome.stdout and "The speed goals" in outcome.stdout
    assert "steps/s" not in outcome.stdout and "matmul peak" not in outcome.stdout


FLEET_FLAGS = ["bench", "fleet", "--quick", "-k", "2", "--steps", "2", "--repeats", "1", "-q"]


def test_bench_fleet_json_rows() -> None:
    # tiny sizes: two members, two steps, one family with BN + dropout (its fleet path) and one without
    families = ["small 2x128 adam bn+dropout", "deep 6x100 sgd"]
    outcome = CliRunner().invoke(app, [*FLEET_FLAGS, *(a for f in families for a in ("-f", f)), "--json"])
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.stdout)
    peak = report["machine"]
    assert peak["threads"] == 1 and peak["matmul_size"] == bench_models.QUICK_MATMUL_SIZE
    assert positive_finite(peak["matmul_gflop_per_s"])
    assert [(row["family"], row["members"], row["steps"]) for row in report["rows"]] == [(f, 2, 2) for f in families]
    for row in report["rows"]:
        rates = ("fleet_member_steps_per_s", "solo_member_steps_per_s", "fleet_gflop_per_s", "solo_gflop_per_s")
        assert all(positive_finite(row[key]) for key in rates), row
        assert row["speedup"] == pytest.approx(row["fleet_member_steps_per_s"] / row["solo_member_steps_per_s"])
        for side in ("fleet", "solo"):
            percent = 100 * row[f"{side}_gflop_per_s"] / peak["matmul_gflop_per_s"]
            assert row[f"{side}_percent_of_peak"] == pytest.approx(percent)
        # GFLOP/s = member-steps/s x FLOPs of one member's step, the same FLOPs on both sides
        assert row["fleet_gflop_per_s"] / row["fleet_member_steps_per_s"] == pytest.approx(
            row["solo_gflop_per_s"] / row["solo_member_steps_per_s"]
        )


def test_bench_fleet_step_flops_is_three_forward_matmuls() -> None:
    from normdrop.bench import fleet as bench_fleet

    spec = bench_fleet.family_specs(bench_fleet.FLEET_FAMILIES["small 2x128 adam"], 3, 5)[0]
    # MNIST-1D: 40 inputs, 10 classes; 2 hidden layers of 128; batch 100
    assert bench_fleet.step_flops(spec) == 3 * 2 * 100 * (40 * 128 + 128 * 128 + 128 * 10)
    specs = bench_fleet.family_specs(bench_fleet.FLEET_FAMILIES["small 2x128 adam"], 3, 5)
    assert [s.data_seed for s in specs] == [s.seed for s in specs] == [0, 1, 2]


def test_bench_fleet_refuses_bad_input_before_work() -> None:
    runner = CliRunner()
    unknown = runner.invoke(app, [*FLEET_FLAGS, "-f", "no such family"])
    assert unknown.exit_code == 2 and "unknown family" in unknown.output
    misplaced = runner.invoke(app, ["bench", "--quick", "fleet"])
    assert misplaced.exit_code == 2 and "do not apply" in misplaced.output
    zero = runner.invoke(app, ["bench", "fleet", "-k", "0"])
    assert zero.exit_code == 2
