"""GPU check of fleet training: a fleet of many study MLPs vs one solo run on one CUDA device, speed and agreement.

Trains ``--members`` (256-1024) members of the study's deep family (6 x 100 ReLU MLP, BN + dropout, SGD with
momentum 0.9, MNIST-1D; seeds 0..K-1 and K learning rates) as one fleet on the GPU (``normdrop.fleet.run_fleet``,
``device="cuda"``, normdrop's composite backend), and the first ``--compare`` members one by one with an ordinary
``nn.Module`` training loop on the GPU (the solo trainer's semantics: same initial weights, batch order, dropout
seed chain, schedule, divergence rule). Prints member-steps per second of each (training steps only) and the largest
absolute difference between a fleet member's final metrics and its solo run's. On a GPU this agreement is a
tolerance (reduction orders differ from run to run of cuBLAS kernels), not the CPU's bitwise contract; it also
trains member 0 on the CPU with ``normdrop.train.run`` and reports that difference too.

Runs in well under 4 minutes on an H200 with the defaults; exits 0 with a message when there is no CUDA device.

    NORMDROP_BACKEND=composite python benchmarks/fleet_gpu_check.py [--members 512] [--steps 400] [--compare 3]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NORMDROP_BACKEND", "composite")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def solo_gpu_run(spec, device) -> tuple[dict[str, float], float]:
    """Train one spec on ``device`` as :func:`normdrop.train.run` does (final metrics, training seconds)."""
    import torch
    import torch.nn.functional as F

    from normdrop.models import build_model
    from normdrop.seeds import derive_seed
    from normdrop.train import _batch_indices, evaluate, learning_rate, load_run_dataset, make_optimizer

    data = load_run_dataset(spec)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    model = build_model(spec, data.input_shape, data.num_classes).to(device)
    optimizer = make_optimizer(spec, [p for p in model.parameters() if p.requires_grad])
    batches = _batch_indices(
        len(y_train), spec.batch_size, torch.Generator().manual_seed(derive_seed(spec.seed, "batch_order"))
    )
    train_time = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(spec.seed, "dropout"))  # dropout seeds are drawn on the CPU generator
        model.train()
        for step in range(spec.steps):
            _synchronize(device)
            start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(spec, step)
            indices = next(batches).to(device)
            loss = F.cross_entropy(model(x_train[indices]), y_train[indices])
            value = loss.item()
            if not math.isfinite(value) or value > spec.diverge_loss:
                return dict.fromkeys(METRICS, math.nan), train_time
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _synchronize(device)
            train_time += time.perf_counter() - start
    train_loss, train_accuracy = evaluate(model, x_train, y_train)
    test_loss, test_accuracy = evaluate(model, x_test, y_test)
    return dict(zip(METRICS, (train_loss, train_accuracy, test_loss, test_accuracy), strict=True)), train_time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=512, help="fleet size K (256-1024 is the intended range)")
    parser.add_argument("--steps", type=int, default=400, help="training steps (the deep family's budget)")
    parser.add_argument("--compare", type=int, default=3, help="members also trained solo on the GPU")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu: a smoke run of this script itself")
    args = parser.parse_args(argv)
    if args.members < 1 or args.compare < 1 or args.compare > args.members or args.steps < 1:
        parser.error("need --members >= --compare >= 1 and --steps >= 1")
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fleet_gpu_check: no CUDA device here (torch.cuda.is_available() is False): skipped")
        return 0
    from normdrop.claims.setting import FAMILIES
    from normdrop.fleet import run_fleet
    from normdrop.spec import RunSpec
    from normdrop.train import run

    fields = {**FAMILIES["deep"], "norm": "batch", "dropout": 0.1, "steps": args.steps}
    specs = [RunSpec(**fields, seed=k, lr=0.01 * (1 + k / args.members)) for k in range(args.members)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}, torch {torch.__version__}, "
        f"backend {os.environ['NORMDROP_BACKEND']}, {args.members} members x {args.steps} steps"
    )

    run_fleet(specs[:2], device=device)  # warm-up (kernels, dataset cache)
    started = time.perf_counter()
    fleet = run_fleet(specs, device=device)
    wall = time.perf_counter() - started
    failed = [r for r in fleet if r.status == "failed"]
    if failed:
        print(f"fleet failed: {failed[0].error}")
        return 1
    fleet_train = sum(r.summary["train_time"] for r in fleet)
    fleet_rate = args.members * args.steps / fleet_train
    print(f"fleet: {fleet_rate:,.0f} member-steps/s (training {fleet_train:.1f} s, wall with evaluation {wall:.1f} s)")

    solo_gpu_run(specs[0].model_copy(update={"steps": 5}), device)  # warm-up
    worst = 0.0
    solo_rate = 0.0
    for k in range(args.compare):
        metrics, seconds = solo_gpu_run(specs[k], device)
        solo_rate = max(solo_rate, args.steps / seconds)
        diffs = {name: abs(fleet[k].summary[name] - metrics[name]) for name in METRICS}
        worst = max(worst, *diffs.values())
        print(f"member {k}: |fleet - solo GPU| " + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items()))
    print(f"solo on the GPU: {solo_rate:,.0f} member-steps/s -> fleet / solo = {fleet_rate / solo_rate:.1f}x")
    print(f"max abs difference of final metrics, fleet members vs their solo GPU runs: {worst:.3e}")

    cpu = run(specs[0])
    cpu_diff = max(abs(fleet[0].summary[name] - cpu.summary[name]) for name in METRICS)
    print(f"member 0 vs its CPU run (normdrop.train.run): max abs difference {cpu_diff:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
