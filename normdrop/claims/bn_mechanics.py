"""bn-mechanics: what a batch norm layer computes, checked on normdrop's layers inside a real network.

Batch normalization (Ioffe & Szegedy 2015, algorithm 1), per unit k over a mini-batch B:

    x_hat = (x - mean_B(x)) / sqrt(var_B(x) + eps)        (biased variance)
    y     = gamma * x_hat + beta
    running_mean <- (1 - m) running_mean + m mean_B(x),   running_var <- (1 - m) running_var + m var_B^unbiased(x)

and at inference x_hat uses the running estimates instead of the batch's statistics, so an example's output does
not depend on the other examples. No training is needed to check this: the rule holds at any weights, so the
layers are measured directly, inside the deep MLP of the study on mini-batches of the study's data, with random
gamma and beta (so that the affine step is not the identity).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import Experiment
from normdrop.claims.figures import finish, legend, new_figure
from normdrop.claims.results import Analysis, measure
from normdrop.claims.setting import StudySetting
from normdrop.seeds import derive_seed

BATCHES = 20
BATCH_SIZE = 100
CHECKS: dict[str, tuple[str, float]] = {
    "batch mean of x_hat": ("max over units and batches of |mean_B(x_hat)|", 1e-4),
    "batch variance of x_hat": ("max |var_B(x_hat) - var_B(x) / (var_B(x) + eps)|", 1e-4),
    "running estimates": ("max relative error of running_mean / running_var vs the moving averages by hand", 1e-4),
    "eval uses running estimates": ("max |y_eval - (gamma (x - running_mean) / sqrt(running_var + eps) + beta)|", 1e-4),
    "eval is per example": ("max |y_eval(example alone) - y_eval(example in a batch)|", 1e-5),
    "matches torch.nn (train)": ("max relative difference of y, dL/dx, dL/dgamma, running stats vs torch.nn", 1e-4),
    "matches torch.nn (eval)": ("max relative difference of y_eval vs torch.nn.BatchNorm1d", 1e-5),
}
"""Each check: what is measured, and the tolerance (float32 rounding of sums over 100 examples is ~1e-6)."""


def per_channel(x: Tensor) -> Tensor:
    """An activation as ``(samples, channels)``: (N, C) unchanged; (N, C, L) or (N, C, H, W) with every position of
    every example a sample of its channel, as BN computes its statistics over all axes but the channel axis."""
    if x.dim() == 2:
        return x
    return x.transpose(0, 1).reshape(x.shape[1], -1).T


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-12))


def _bn_model(setting: StudySetting, seed: int) -> tuple[torch.nn.Module, Tensor]:
    from normdrop.models import build_model
    from normdrop.train import load_run_dataset

    spec = setting.spec("deep", norm="batch", lr=setting.probe_lr, seed=seed)
    data = load_run_dataset(spec)
    model = build_model(spec, data.input_shape, data.num_classes)
    generator = torch.Generator().manual_seed(derive_seed(seed, "bn-mechanics"))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.weight.copy_(0.5 + 1.5 * torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return model, data.x_train


def measure_seed(setting: StudySetting, seed: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Deviation of every check of :data:`CHECKS` for one seed, and data for the figures."""
    model, x_train = _bn_model(setting, seed)
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    captured: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name, _ in norms}
    handles = [
        module.register_forward_hook(
            lambda _m, args, out, name=name: captured[name].append((args[0].detach().clone(), out.detach().clone()))
        )
        for name, module in norms
    ]
    generator = torch.Generator().manual_seed(derive_seed(seed, "bn-mechanics-batches"))
    expected_mean = {name: torch.zeros(m.num_features, dtype=torch.float64) for name, m in norms}
    running_trace: dict[str, list[float]] = {name: [] for name, _ in norms}
    expected_var = {name: torch.ones(m.num_features, dtype=torch.float64) for name, m in norms}
    deviation = dict.fromkeys(CHECKS, 0.0)
    model.train()
    try:
        with torch.no_grad():
            for _ in range(BATCHES):
                model(x_train[torch.randint(0, len(x_train), (BATCH_SIZE,), generator=generator)])
    finally:
        for handle in handles:
            handle.remove()
    for name, module in norms:
        gamma, beta, eps, m = module.weight.detach(), module.bias.detach(), module.eps, module.momentum
        for x_raw, y_raw in captured[name]:
            x, y = per_channel(x_raw), per_channel(y_raw)
            x_hat = (y - beta) / gamma
            var = x.double().var(dim=0, unbiased=False)
            deviation["batch mean of x_hat"] = max(deviation["batch mean of x_hat"], float(x_hat.mean(0).abs().max()))
            deviation["batch variance of x_hat"] = max(
                deviation["batch variance of x_hat"],
                float((x_hat.double().var(0, unbiased=False) - var / (var + eps)).abs().max()),
            )
            expected_mean[name] = (1 - m) * expected_mean[name] + m * x.double().mean(0)
            running_trace[name].append(float(expected_mean[name][0]))
            expected_var[name] = (1 - m) * expected_var[name] + m * x.double().var(0, unbiased=True)
        deviation["running estimates"] = max(
            deviation["running estimates"],
            _relative(module.running_mean, expected_mean[name]),
            _relative(module.running_var, expected_var[name]),
        )
    # inference: one more batch in eval mode
    model.eval()
    batch = x_train[torch.randint(0, len(x_train), (BATCH_SIZE,), generator=generator)]
    eval_io: dict[str, tuple[Tensor, Tensor]] = {}
    handles = [
        module.register_forward_hook(lambda _m, args, out, name=name: eval_io.__setitem__(name, (args[0], out)))
        for name, module in norms
    ]
    with torch.no_grad():
        batched = model(batch)
        alone = model(batch[:1])
    for handle in handles:
        handle.remove()
    deviation["eval is per example"] = float((alone[0] - batched[0]).abs().max())
    for name, module in norms:
        x, y = (per_channel(t) for t in eval_io[name])
        weight, bias = module.weight.detach(), module.bias.detach()
        formula = (x - module.running_mean) / torch.sqrt(module.running_var + module.eps) * weight + bias
        deviation["eval uses running estimates"] = max(
            deviation["eval uses running estimates"], float((y - formula).abs().max())
        )
    deviation["matches torch.nn (train)"], deviation["matches torch.nn (eval)"] = _against_torch(
        norms[0][1], captured[norms[0][0]][0][0], seed
    )
    name0 = norms[len(norms) // 2][0]
    x0, y0 = (per_channel(t) for t in captured[name0][-1])
    module0 = dict(norms)[name0]
    pictures = {
        "layer": name0,
        "inputs": x0[:, :3].numpy(),
        "normalized": ((y0 - module0.bias.detach()) / module0.weight.detach())[:, :3].numpy(),
        "outputs": y0[:, :3].numpy(),
        "gamma": module0.weight.detach()[:3].numpy(),
        "beta": module0.bias.detach()[:3].numpy(),
        "batch_means": np.array([float(per_channel(x)[:, 0].mean()) for x, _ in captured[name0]]),
        "running_mean": np.array(running_trace[name0]),
    }
    return deviation, pictures


def _against_torch(layer: _BatchNorm, x: Tensor, seed: int) -> tuple[float, float]:
    """normdrop's layer vs torch.nn's BatchNorm of the input's rank (1d for (N, C) and (N, C, L), 2d for
    (N, C, H, W)) from the same state on the same input: (train, eval) deviation."""
    reference_cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[x.dim()]
    reference = reference_cls(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    mine = type(layer)(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    mine.load_state_dict(layer.state_dict())
    reference.load_state_dict(layer.state_dict())
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(derive_seed(seed, "bn-upstream")))
    outputs, grads = [], []
    for module in (mine, reference):
        module.train()
        inputs = x.clone().requires_grad_(True)
        out = module(inputs)
        (out * upstream).sum().backward()
        outputs.append(out.detach())
        grads.append((inputs.grad, module.weight.grad, module.bias.grad))
    train = max(
        _relative(outputs[0], outputs[1]),
        *(_relative(a, b) for a, b in zip(grads[0], grads[1], strict=True)),
        _relative(mine.running_mean, reference.running_mean),
        _relative(mine.running_var, reference.running_var),
    )
    mine.eval()
    reference.eval()
    with torch.no_grad():
        evaluation = _relative(mine(x), reference(x))
    return train, evaluation


class BNMechanics(Claim):
    id = "bn-mechanics"
    title = "What batch norm computes"
    statement = (
        "BN standardizes each unit over the mini-batch to zero mean and unit variance, then applies a learned scale "
        "(gamma) and shift (beta); at inference it uses running estimates of the mean and variance instead."
    )
    mechanism = (
        "During training, a BN layer looks at the values one unit takes across the examples of the mini-batch, "
        "subtracts their mean and divides by their standard deviation, so every unit enters the next layer "
        "centred at 0 with spread 1. Two learned numbers per unit, gamma and beta, then stretch and shift it, "
        "so the network can undo the standardization where that helps. The layer also keeps moving averages of "
        "the batch means and variances; at inference it uses those, so a prediction never depends on which "
        "other examples happen to share its batch."
    )
    rationale = (
        "A rule about what a layer computes needs no training: it holds at any weights. The checks run normdrop's "
        "BatchNorm1d layers inside the study's deep MLP on mini-batches of the study's data, with random gamma and "
        "beta, and compare with the formulas and with torch.nn.BatchNorm1d from the same state. Each seed draws "
        "other weights, gamma, beta and batches. Limit: float32 arithmetic, so agreement is up to rounding; the "
        "tolerances are stated per check. In a convolutional network a unit is a channel, its statistics taken "
        "over the examples and every position."
    )
    caveats = (
        "The variance is standardized to var / (var + eps), not exactly 1; eps (1e-5) matters only for units whose "
        "batch variance is tiny. Running estimates lag behind the weights during training, which is why precise "
        "re-estimation after training (Wu & Johnson 2021) can change test accuracy."
    )
    references = ("Ioffe & Szegedy 2015, algorithm 1 and section 3.1",)
    per_setting = False

    def experiment(self, setting: StudySetting) -> Experiment:
        return Experiment(
            description=(
                f"No training runs. Per seed: the deep net ({setting.spec('deep').model}) with BN "
                f"({setting.spec('deep').depth} BN layers; per-channel statistics over all axes but the channel) on "
                f"{BATCHES} training mini-batches of {BATCH_SIZE} examples of {setting.dataset}, then one "
                "batch in eval mode; the first BN layer is compared with torch.nn.BatchNorm1d."
            )
        )

    def analyze(self, data: ClaimData) -> Analysis:
        per_check: dict[str, dict[int, float]] = {name: {} for name in CHECKS}
        pictures: dict[str, Any] = {}
        for seed in data.setting.seed_list:
            deviation, seed_pictures = measure_seed(data.setting, seed)
            pictures = pictures or seed_pictures
            for name, value in deviation.items():
                per_check[name][seed] = value
        worst = {
            seed: max(per_check[name][seed] / tolerance for name, (_, tolerance) in CHECKS.items())
            for seed in data.setting.seed_list
        }
        primary = measure(
            "worst deviation from the rule, in units of its tolerance",
            "max over the checks of deviation / tolerance (1 = at the tolerance)",
            worst,
            "decrease",
            null=1.0,
            unit="x tolerance",
        )
        secondary = [
            measure(name, f"{what} (tolerance {tolerance:g})", per_check[name], "decrease", null=tolerance)
            for name, (what, tolerance) in CHECKS.items()
        ]
        failing = [name for name, (_, tol) in CHECKS.items() if max(per_check[name].values()) >= tol]
        findings = [
            "Every check is within its tolerance for every seed."
            if not failing
            else f"Checks beyond tolerance: {', '.join(failing)}."
        ]
        return Analysis(primary, secondary, [_histograms(pictures), _running(pictures)], [], findings)


def _histograms(pictures: dict[str, Any]) -> Any:
    figure, axes = new_figure(ncols=3, height=2.9)
    panels = [
        ("inputs", "input x to BN", "x (pre-activation units)"),
        ("normalized", "standardized x_hat", "x_hat (standard deviations)"),
        ("outputs", "output gamma x_hat + beta", "y (pre-activation units)"),
    ]
    for ax, (key, title, xlabel) in zip(axes, panels, strict=True):
        values = pictures[key]
        bins = np.linspace(values.min(), values.max(), 25)
        for unit in range(values.shape[1]):
            label = f"unit {unit}"
            if key == "outputs":
                label += f" (gamma {pictures['gamma'][unit]:.2f}, beta {pictures['beta'][unit]:+.2f})"
            ax.hist(values[:, unit], bins=bins, alpha=0.55, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("examples in the batch", fontsize=8)
    legend(axes[2], fontsize=6, loc="upper left")
    return finish(
        figure,
        "What BN does to one mini-batch",
        f"Three units of layer {pictures['layer']} over one training mini-batch of {BATCH_SIZE} examples: their "
        "inputs (left) have different centres and spreads; after standardization (middle) each is centred at 0 "
        "with spread 1; the learned gamma and beta (right) then scale and shift each unit.",
    )


def _running(pictures: dict[str, Any]) -> Any:
    figure, ax = new_figure(height=2.8)
    means = pictures["batch_means"]
    ax.plot(range(1, len(means) + 1), means, "o-", label="mean of this batch (used in training)", color="#d2691e")
    running = pictures["running_mean"]
    ax.step(
        range(1, len(running) + 1), running, where="post", color="#1f6fb4", label="running mean (used at inference)"
    )
    ax.set_xlabel("training mini-batch")
    ax.set_ylabel("mean input of unit 0 (pre-activation units)")
    legend(ax, fontsize=8)
    return finish(
        figure,
        "Training uses the batch's statistics, inference the running estimate",
        f"Unit 0 of layer {pictures['layer']}: each training batch has its own mean (orange), which BN subtracts "
        "in training; the moving average of these means (blue) is what BN subtracts at inference. The running "
        "estimate starts at 0 and each batch moves it 10% of the way towards that batch's mean (momentum 0.1), so "
        "it approaches the typical batch mean geometrically; the layer keeps it in its running_mean buffer.",
    )


CLAIM = BNMechanics()
