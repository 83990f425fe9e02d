"""normdrop ablate: arms by surgery on models the tests define, not-applicable reasons, verdicts from synthetic
runs with known effects, store reuse by fingerprint, the user-data checks, fit on DataLoaders, the CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import normdrop
from normdrop.ablation import UserInputError
from normdrop.ablation.arms import apply_arm, trace
from normdrop.ablation.inputs import model_fingerprint, prepare_data
from normdrop.spec import RunResult, UserRunSpec
from normdrop.store import Store
from normdrop.train import fit


class BatchNormAct1d(nn.BatchNorm1d):
    """BN with a built-in activation (timm's norm_act style)."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


def cnn() -> nn.Module:
    """Conv + BatchNorm2d, dropout feeding a BatchNorm1d, classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(4 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3),
    )  # fmt: skip


def residual() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Residual(4), nn.Flatten(), nn.Linear(64, 3))


def plain_mlp() -> nn.Module:
    """No BN, dropout after the hidden layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 3))


def bn_mlp() -> nn.Module:
    """BN, no dropout."""
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))


def act_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), BatchNormAct1d(12), nn.Linear(12, 3))


def tiny_data(n_train: int = 48, n_test: int = 24, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Three Gaussian classes of 1x4x4 images."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 1, 4, 4)).astype(np.float32)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 3
        return (centers[y] + 0.5 * rng.normal(size=(n, 1, 4, 4))).astype(np.float32), y

    return (*split(n_train), *split(n_test))


SAMPLE = torch.randn(4, 1, 4, 4)


def kinds(model: nn.Module) -> list[str]:
    return [layer.kind for layer in trace(model, SAMPLE).layers]


# ---- arms ---------------------------------------------------------------------------------------------------


def test_arms_of_a_cnn_with_bn_and_dropout_before_bn():
    model = cnn()
    assert kinds(model) == ["weight", "norm", "dropout", "weight", "norm", "weight"]
    x = torch.randn(6, 1, 4, 4)
    no_bn = apply_arm(copy.deepcopy(model), "remove_bn", SAMPLE, {})
    assert kinds(no_bn) == ["weight", "dropout", "weight", "weight"]
    moved = apply_arm(copy.deepcopy(model), "dropout_after_last_bn", SAMPLE, {})
    assert kinds(moved) == ["weight", "norm", "weight", "norm", "dropout", "weight"]
    assert [layer.module.p for layer in trace(moved, SAMPLE).of("dropout")] == [0.3]
    torch.testing.assert_close(moved.eval()(x), model.eval()(x))  # same weights; dropout is off in eval
    with pytest.raises(normdrop.ablation.arms.NotApplicable, match="already has batch norm"):
        apply_arm(copy.deepcopy(model), "add_bn", SAMPLE, {})
    with pytest.raises(normdrop.ablation.arms.NotApplicable, match="does not split into ghost batches of 5"):
        apply_arm(copy.deepcopy(model), "ghost_bn=5", SAMPLE, {"batch_sizes": (16,)})
    ghost = apply_arm(copy.deepcopy(model), "ghost_bn=4", SAMPLE, {"batch_sizes": (16,)})
    assert sum(isinstance(m, normdrop.nn.GhostBatchNorm2d | normdrop.nn.GhostBatchNorm1d) for m in ghost.modules()) == 2


def test_arms_of_models_without_bn_without_dropout_residual_and_bn_act():
    added = apply_arm(plain_mlp(), "add_bn", SAMPLE, {})
    assert kinds(added) == ["weight", "norm", "dropout", "weight"]  # BN after the hidden layer, not the classifier
    with pytest.raises(normdrop.ablation.arms.NotApplicable, match="no batch norm to remove"):
        apply_arm(plain_mlp(), "remove_bn", SAMPLE, {})
    with pytest.raises(normdrop.ablation.arms.NotApplicable, match="no batch norm: there is no dropout to move"):
        apply_arm(plain_mlp(), "dropout_after_last_bn", SAMPLE, {})
    assert kinds(apply_arm(bn_mlp(), "add_dropout=0.5", SAMPLE, {})) == ["weight", "norm", "dropout", "weight"]
    with pytest.raises(normdrop.ablation.arms.NotApplicable, match="no dropout to remove"):
        apply_arm(bn_mlp(), "remove_dropout", SAMPLE, {})
    with pytest.raises(normdrop.ablation.arms.NotApplicable, match="no dropout layer comes before a BN"):
        apply_arm(bn_mlp(), "dropout_after_last_bn", SAMPLE, {})
    res = residual()
    no_bn = apply_arm(copy.deepcopy(res), "remove_bn", SAMPLE, {})
    x = torch.randn(3, 1, 4, 4)
    expected = res[3](res[2](torch.relu(res[0](x) + res[1].conv(res[0](x)))))
    torch.testing.assert_close(no_bn(x), expected)  # the skip connection and forward's ReLU are kept
    act = apply_arm(act_mlp(), "remove_bn", SAMPLE, {})
    lin1, lin2 = act[1], act[3]
    torch.testing.assert_close(act(x), lin2(torch.relu(lin1(x.flatten(1)))))  # BatchNormAct's ReLU kept


# ---- verdicts from synthetic runs ----------------------------------------------------------------------------


def fake_trainer(effects: dict[str, float], calls: list[str] | None = None):
    """Runs whose metrics depend on the arm: test accuracy 0.8 + effects[knob] per knob present (+ seed noise);
    BN arms reach full training accuracy at step 20, plain ones at step 60 (of 100)."""

    def train(spec: UserRunSpec, model: nn.Module, data) -> RunResult:
        if calls is not None:
            calls.append(spec.arm)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        has_dropout = any(isinstance(m, nn.Dropout) for m in model.modules())
        test = 0.8 + 0.01 * ((spec.seed * 7) % 3) + effects.get("dropout", 0.0) * has_dropout
        test += effects.get("bn", 0.0) * has_bn
        full_at = 20 if has_bn else 60
        metrics = []
        for step in range(0, 101, 10):
            reached = min(1.0, 0.3 + 0.7 * step / full_at)
            metrics += [
                (step, "train_accuracy", reached),
                (step, "test_accuracy", test * reached),
                (step, "train_loss", 2.0 - reached),
                (step, "test_loss", 2.0 - test * reached),
            ]
        return RunResult(spec.run_id, spec, "finished", metrics=metrics, summary={"diverged": False})

    return train


def test_known_effects_give_the_verdicts(tmp_path):
    data = tiny_data()
    common = {"seeds": 4, "steps": 100, "batch_size": 16, "store": tmp_path / "runs.sqlite", "progress": False}
    claims = ["bn-faster", "dropout-generalizes", "dropout-overfit", "dropout-bn-shift"]
    outcome = normdrop.ablate(cnn, data, claims=claims, trainer=fake_trainer({"dropout": 0.05}), **common)
    verdicts = outcome.verdicts()
    assert verdicts["bn-faster"] == "supported"  # BN reaches the target 3x sooner in every seed
    assert verdicts["dropout-generalizes"] == "supported"  # +5 pp with dropout
    assert verdicts["dropout-overfit"] == "supported"
    shift = next(c for c in outcome.claims if c.id == "dropout-bn-shift")
    assert shift.verdict == "not measurable"  # the fake runs carry no variance-shift records
    hurt = normdrop.ablate(
        cnn,
        data,
        claims=["dropout-generalizes"],
        trainer=fake_trainer({"dropout": -0.05}),
        **{**common, "store": tmp_path / "b.sqlite"},
    )
    assert hurt.verdicts()["dropout-generalizes"] == "contradicted"


def test_claims_that_cannot_apply_say_why_and_unsupported_ones_are_named(tmp_path):
    calls: list[str] = []
    outcome = normdrop.ablate(
        bn_mlp,
        tiny_data(),
        claims=["dropout-bn-shift", "bn-mechanics", "dropout-generalizes"],
        seeds=2,
        steps=100,
        batch_size=16,
        store=tmp_path / "runs.sqlite",
        progress=False,
        trainer=fake_trainer({}, calls),
    )
    by_id = {c.id: c for c in outcome.claims}
    assert by_id["dropout-bn-shift"].status == "not applicable"
    assert "no dropout layer comes before a BN" in by_id["dropout-bn-shift"].reason
    assert by_id["bn-mechanics"].status == "not supported" and "layers themselves" in by_id["bn-mechanics"].reason
    assert by_id["dropout-generalizes"].status == "tested"  # dropout added before the classifier
    assert "dropout_after_last_bn" not in calls and any(arm.startswith("add_dropout") for arm in calls)


def test_runs_are_reused_from_the_store_and_fingerprints_change_with_what_they_cover(tmp_path):
    calls: list[str] = []
    data = tiny_data()
    kwargs = {
        "claims": ["dropout-overfit"],
        "seeds": 2,
        "batch_size": 16,
        "steps": 100,
        "store": tmp_path / "r.sqlite",
        "progress": False,
    }
    first = normdrop.ablate(plain_mlp, data, trainer=fake_trainer({}, calls), **kwargs)
    assert len(calls) == 4 and first.runs["trained"] == 4
    again = normdrop.ablate(plain_mlp, data, trainer=fake_trainer({}, calls), **kwargs)
    assert len(calls) == 4 and again.runs["reused"] == 4 and again.verdicts() == first.verdicts()
    changed = list(data)
    changed[0] = changed[0].copy()
    changed[0][0, 0, 0, 0] += 1.0
    normdrop.ablate(plain_mlp, tuple(changed), trainer=fake_trainer({}, calls), **kwargs)
    assert len(calls) == 8  # other data, other runs
    normdrop.ablate(plain_mlp, data, trainer=fake_trainer({}, calls), lr=3e-3, **kwargs)
    assert len(calls) == 12  # other training settings, other runs
    with Store(tmp_path / "r.sqlite") as store:
        stored = store.result(next(iter(store.completed_ids())))
    assert isinstance(stored.spec, UserRunSpec)

    class Skip(nn.Module):  # same modules as Residual, another forward
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
            self.bn = nn.BatchNorm2d(channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.bn(self.conv(x))

    assert model_fingerprint(Residual(4)) == model_fingerprint(Residual(4))
    assert model_fingerprint(Skip(4)) != model_fingerprint(Residual(4))


# ---- inputs ---------------------------------------------------------------------------------------------------


def test_bad_data_and_models_are_one_line_errors(tmp_path):
    x_train, y_train, x_test, y_test = tiny_data()
    with pytest.raises(UserInputError, match="X_train has 48 examples but y_train has 47 labels"):
        prepare_data((x_train, y_train[:-1], x_test, y_test))
    with pytest.raises(UserInputError, match="labels must be integer class indices"):
        prepare_data((x_train, y_train + 0.5, x_test, y_test))
    with pytest.raises(UserInputError, match="expected \\(X_train, y_train, X_test, y_test\\)"):
        prepare_data((x_train, y_train, x_test))
    with pytest.raises(UserInputError, match=r"returned int, expected a torch\.nn\.Module"):
        normdrop.ablate(
            lambda: 3, (x_train, y_train, x_test, y_test), batch_size=16, store=tmp_path / "s.sqlite", progress=False
        )
    datasets = (
        torch.utils.data.TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        torch.utils.data.TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test)),
    )
    from_datasets = prepare_data(datasets)
    assert from_datasets.fingerprint == prepare_data((x_train, y_train, x_test, y_test)).fingerprint
    assert from_datasets.describe()["class_counts_train"] == [16, 16, 16]


def test_fit_on_a_dataloader_matches_a_hand_written_loop():
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in tiny_data())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=16)
    test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_test, y_test), batch_size=16)
    torch.manual_seed(0)
    model = bn_mlp()
    reference = copy.deepcopy(model)
    spec = UserRunSpec(
        model="bn_mlp",
        model_fingerprint="m",
        init_fingerprint="i",
        data_fingerprint="d",
        steps=7,
        eval_every=3,
        lr=0.01,
    )
    result = fit(spec, model, loader, test)
    assert result.status == "finished", result.error
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    batches = [batch for _ in range(3) for batch in loader][:7]  # 3 batches per epoch, epochs repeat
    for inputs, labels in batches:
        loss = nn.functional.cross_entropy(reference(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for ours, theirs in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs)
    reference.eval()
    accuracy = float((reference(x_test).argmax(1) == y_test).float().mean())
    assert result.summary["test_accuracy"] == pytest.approx(accuracy)


# ---- end to end with the real trainer, and the CLI ------------------------------------------------------------


def test_real_runs_write_the_report_and_measure_the_variance_shift(tmp_path):
    outcome = normdrop.ablate(
        cnn,
        tiny_data(),
        claims=["dropout-bn-shift"],
        seeds=2,
        steps=12,
        batch_size=16,
        out=tmp_path / "report",
        store=tmp_path / "runs.sqlite",
        progress=False,
    )
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["model"]["parameters"] == sum(p.numel() for p in cnn().parameters())
    assert summary["data"]["input_shape"] == [1, 4, 4] and summary["data"]["num_classes"] == 3
    assert summary["arms"]["dropout_after_last_bn"]["applicable"]
    claim = summary["claims"][0]
    assert claim["status"] == "tested" and len(claim["primary"]["per_seed"]) == 2  # both seeds measured a shift
    assert "dropout-bn-shift" in (tmp_path / "report" / "report.html").read_text()
    assert outcome.runs == {"total": 4, "reused": 0, "trained": 4, "failed": 0}


def test_cli_errors_name_what_was_wrong(tmp_path):
    from normdrop.cli import app

    model_file = tmp_path / "model.py"
    model_file.write_text(
        "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))\n"
    )
    x_train, y_train, x_test, y_test = tiny_data()
    bad = tmp_path / "bad.npz"
    np.savez(bad, X_train=x_train, y_train=y_train[:10], X_test=x_test, y_test=y_test)
    runner = CliRunner()
    cases = {
        f"{tmp_path}/missing.py:build": "no such file",
        f"{model_file}:nope": "has no attribute 'nope'",
        f"{model_file}:torch": "is not callable",
    }
    for reference, message in cases.items():
        result = runner.invoke(app, ["ablate", reference, "--data", str(bad), "--store", str(tmp_path / "s.sqlite")])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, ["ablate", f"{model_file}:build", "--data", str(bad), "--store", str(tmp_path / "s")])
    assert result.exit_code == 2 and "X_train has 48 examples but y_train has 10 labels" in result.output


def test_the_model_name_is_not_part_of_the_run_id():
    fields = {"model_fingerprint": "m", "init_fingerprint": "i", "data_fingerprint": "d"}
    assert UserRunSpec(model="build", **fields).run_id == UserRunSpec(model="model.py:build", **fields).run_id
    assert UserRunSpec(model="build", **fields).run_id != UserRunSpec(model="build", **{**fields, "arm": "x"}).run_id


def test_dataloaders_go_through_the_whole_path_and_reproduce(tmp_path):
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in tiny_data())
    y_train, y_test = y_train.long(), y_test.long()

    def loaders():
        train = torch.utils.data.TensorDataset(x_train, y_train)
        test = torch.utils.data.TensorDataset(x_test, y_test)
        loader = torch.utils.data.DataLoader(train, batch_size=12, shuffle=True)
        return loader, torch.utils.data.DataLoader(test, batch_size=12)

    kwargs = {"claims": ["dropout-overfit"], "seeds": 2, "steps": 6, "progress": False}
    first = normdrop.ablate(plain_mlp, loaders(), store=tmp_path / "a.sqlite", **kwargs)
    second = normdrop.ablate(plain_mlp, loaders(), store=tmp_path / "b.sqlite", **kwargs)
    assert first.data["form"] == "DataLoaders" and first.runs["trained"] == 4
    per_seed = [o.claims[0].analysis.primary.per_seed for o in (first, second)]
    assert per_seed[0] == per_seed[1] and len(per_seed[0]) == 2  # shuffling loaders, same numbers in a fresh store


CHROMIUM = os.environ.get("NORMDROP_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def test_the_report_opens_in_headless_chromium_and_its_first_screen_describes_the_model(tmp_path):
    """The report's first screen, rendered by a real browser: the user's model (parameters, layers per arm), the
    verdict table; the screenshot is kept in test-artifacts/ablate-report.png."""
    normdrop.ablate(
        cnn,
        tiny_data(),
        claims=["dropout-bn-shift"],
        seeds=2,
        steps=12,
        batch_size=16,
        out=tmp_path / "report",
        store=tmp_path / "runs.sqlite",
        progress=False,
    )
    page = (tmp_path / "report" / "report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1200,900"]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ablate-report.png"
    shot.unlink(missing_ok=True)
    subprocess.run(
        [CHROMIUM, *flags, "--hide-scrollbars", f"--screenshot={shot}", page],
        check=True,
        timeout=90,
        capture_output=True,
    )
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page], check=True, timeout=90, capture_output=True, text=True)
    parameters = sum(p.numel() for p in cnn().parameters())
    assert f"{parameters} parameters" in dom.stdout
    assert "Where BN and dropout sit, per arm" in dom.stdout and "dropout-bn-shift" in dom.stdout
