"""SyncBatchNorm: 2 CPU processes (gloo) against one BatchNorm over the union batch -- forward, input / weight /
bias gradients and running statistics, uneven batch sizes --, a 2-process DDP training, the single-process
fallback, and the process-group launcher's errors and timeouts."""

from __future__ import annotations

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
from conftest import available_backends, use_path
from torch.nn.parallel import DistributedDataParallel

import normdrop.nn as nd
from normdrop.nn.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm, run_in_process_group

TIMEOUT_S = 50.0
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}

# (per-rank batch sizes, trailing shape, dtype, affine, momentum): uneven batches everywhere, a rank with one
# sample of a (N, C) input (not enough for BN alone, enough for the group), and a rank with an empty batch.
CASES = [
    ((1, 4), (3,), torch.float64, True, 0.1),
    ((3, 2), (3, 4, 5), torch.float32, False, None),
    ((2, 5), (3, 7), torch.float64, True, 0.3),
    ((4, 0), (3,), torch.float64, True, 0.1),
]
STEPS = 2


def _case_data(sizes, shape, dtype, seed):
    """Per-step union inputs and upstream gradients, shifted and scaled per channel so the statistics matter."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    channels = shape[0]
    view = (1, channels) + (1,) * (len(shape) - 1)
    steps = []
    for step in range(STEPS):
        x = torch.randn((total, *shape), generator=generator, dtype=torch.float64)
        x = x * torch.linspace(0.5, 3.0, channels, dtype=torch.float64).view(view) + step
        grad = torch.randn((total, *shape), generator=generator, dtype=torch.float64)
        steps.append((x.to(dtype), grad.to(dtype)))
    return steps


def _init_affine(layer):
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.linspace(0.5, 1.5, layer.num_features))
            layer.bias.copy_(torch.linspace(-0.2, 0.3, layer.num_features))
    return layer


def _sync_worker(rank, world_size, backend_names):
    """Every case, every backend: this rank's outputs, input gradients, parameter gradients and buffers."""
    torch.set_num_threads(1)
    results = []
    for backend in backend_names:
        use_path(backend)
        for index, (sizes, shape, dtype, affine, momentum) in enumerate(CASES):
            layer = _init_affine(SyncBatchNorm(shape[0], momentum=momentum, affine=affine).to(dtype))
            start = sum(sizes[:rank])
            steps = []
            for x_union, grad_union in _case_data(sizes, shape, dtype, seed=index):
                x = x_union[start : start + sizes[rank]].clone().requires_grad_()
                y = layer(x)
                y.backward(grad_union[start : start + sizes[rank]])
                steps.append((y.detach(), x.grad))
            grads = (layer.weight.grad, layer.bias.grad) if affine else (None, None)
            layer.eval()
            eval_x = _case_data(sizes, shape, dtype, seed=100 + index)[0][0][start : start + sizes[rank]]
            results.append((backend, index, steps, grads, layer.state_dict(), layer(eval_x).detach()))
    # Too few values over the whole group is an error on every rank (not a hang).
    try:
        SyncBatchNorm(2)(torch.randn(1 - rank, 2))
        too_few = None
    except ValueError as error:
        too_few = str(error)
    return results, too_few


@pytest.mark.slow
def test_two_processes_match_one_batch_norm_over_the_union_batch():
    backends = available_backends()
    (rank0, too_few0), (rank1, too_few1) = run_in_process_group(_sync_worker, 2, (backends,), timeout_s=TIMEOUT_S)
    for too_few in (too_few0, too_few1):
        assert too_few is not None and "more than 1 value per channel over the process group" in too_few
    assert len(rank0) == len(rank1) == len(backends) * len(CASES)
    for (backend, index, steps0, grads0, state0, eval0), (_, _, steps1, grads1, state1, eval1) in zip(
        rank0, rank1, strict=True
    ):
        sizes, shape, dtype, affine, momentum = CASES[index]
        tol = TOL[dtype]
        use_path(backend)
        try:
            reference = _init_affine(nd.BatchNorm1d(shape[0], momentum=momentum, affine=affine).to(dtype))
            if len(shape) == 3:
                reference = _init_affine(nd.BatchNorm2d(shape[0], momentum=momentum, affine=affine).to(dtype))
            for step, (x_union, grad_union) in enumerate(_case_data(sizes, shape, dtype, seed=index)):
                x = x_union.clone().requires_grad_()
                y = reference(x)
                y.backward(grad_union)
                torch.testing.assert_close(torch.cat([steps0[step][0], steps1[step][0]]), y.detach(), **tol)
                torch.testing.assert_close(torch.cat([steps0[step][1], steps1[step][1]]), x.grad, **tol)
            if affine:
                # Each rank holds its share of the parameter gradients; the shares add up to the union's.
                torch.testing.assert_close(grads0[0] + grads1[0], reference.weight.grad, **tol)
                torch.testing.assert_close(grads0[1] + grads1[1], reference.bias.grad, **tol)
            for key, value in reference.state_dict().items():
                torch.testing.assert_close(state0[key], value, **tol, msg=f"case {index} {key} differs")
                torch.testing.assert_close(state1[key], value, **tol, msg=f"case {index} {key} differs")
            reference.eval()
            eval_x = _case_data(sizes, shape, dtype, seed=100 + index)[0][0]
            torch.testing.assert_close(torch.cat([eval0, eval1]), reference(eval_x), **tol)
        finally:
            use_path(None)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), nd.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2)
    ).double()


DDP_SIZES = (5, 3)
DDP_STEPS = 4
DDP_LR = 0.1


def _ddp_data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(sum(DDP_SIZES), 4, generator=generator, dtype=torch.float64) * 2 + 1
    target = torch.randn(sum(DDP_SIZES), 2, generator=generator, dtype=torch.float64)
    return x, target


def _ddp_worker(rank, world_size):
    torch.set_num_threads(1)
    model = convert_sync_batchnorm(_model())
    assert isinstance(model[1], SyncBatchNorm)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=DDP_LR)
    x, target = _ddp_data()
    start = sum(DDP_SIZES[:rank])
    x, target = x[start : start + DDP_SIZES[rank]], target[start : start + DDP_SIZES[rank]]
    # DDP averages gradients over ranks, so a per-rank loss of (world size / union size) * local sum makes the
    # update that of the mean loss over the union batch, whatever the batch sizes.
    scale = world_size / sum(DDP_SIZES)
    for _ in range(DDP_STEPS):
        optimizer.zero_grad()
        loss = scale * ((ddp(x) - target) ** 2).sum()
        loss.backward()
        optimizer.step()
    return model.state_dict()


@pytest.mark.slow
def test_ddp_training_with_sync_batch_norm_matches_single_process_training():
    states = run_in_process_group(_ddp_worker, 2, timeout_s=TIMEOUT_S)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    x, target = _ddp_data()
    for _ in range(DDP_STEPS):
        optimizer.zero_grad()
        ((model(x) - target) ** 2).sum().div(len(x)).backward()
        optimizer.step()
    for key, value in model.state_dict().items():
        for rank, state in enumerate(states):
            torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-10, msg=f"rank {rank}: {key} differs")


def _failing_worker(rank, world_size):
    if rank == 1:
        raise RuntimeError("rank one gives up")
    dist.barrier()  # would wait for rank 1 forever without the launcher's clean-up


def _sleeping_worker(rank, world_size):
    time.sleep(60)


@pytest.mark.slow
def test_launcher_reports_a_failing_rank_and_times_out_instead_of_hanging():
    with pytest.raises(RuntimeError, match="rank one gives up"):
        run_in_process_group(_failing_worker, 2, timeout_s=TIMEOUT_S)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish"):
        run_in_process_group(_sleeping_worker, 1, timeout_s=6.0)
    assert time.monotonic() - start < 20.0


@pytest.mark.parametrize("world_size", [0, -2, 1.5, True])
def test_launcher_rejects_bad_world_sizes(world_size):
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        run_in_process_group(_sleeping_worker, world_size)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5, 5)])
def test_without_a_process_group_or_with_one_process_it_is_batch_norm(backend, shape):
    layer, reference = nd.SyncBatchNorm(3), nd.BatchNorm2d(3) if len(shape) == 4 else nd.BatchNorm1d(3)

    def check():
        for module in (layer, reference):
            module.train()
        x = torch.randn(shape, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        torch.testing.assert_close(layer(x), reference(x_ref))
        layer(x).sum().backward()
        reference(x_ref).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(layer.running_var, reference.running_var)

    assert not dist.is_initialized()
    check()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        check()
    finally:
        dist.destroy_process_group()


def test_convert_sync_batchnorm_keeps_state_and_skips_variants():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        nd.BatchNorm2d(4, momentum=None, affine=False),
        nd.GhostBatchNorm2d(4, 2),
        torch.nn.Sequential(torch.nn.BatchNorm1d(5, eps=1e-3)),
    ).double()
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].weight.fill_(2.0)
    model[1].bias.requires_grad_(False)
    model.eval()
    converted = convert_sync_batchnorm(model)
    assert [type(converted[i]) for i in (1, 2, 3)] == [SyncBatchNorm, SyncBatchNorm, nd.GhostBatchNorm2d]
    assert isinstance(converted[4][0], SyncBatchNorm) and converted[4][0].eps == 1e-3
    assert converted[2].momentum is None and not converted[2].affine
    assert converted[1].running_mean.dtype == torch.float64 and float(converted[1].running_mean[0]) == 0.5
    assert float(converted[1].weight.detach()[0]) == 2.0 and not converted[1].bias.requires_grad
    assert not converted[1].training
