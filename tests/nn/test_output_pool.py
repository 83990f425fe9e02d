"""The pool of large output buffers (normdrop.nn.kernels.numba_cpu.memory): memory in use is never handed out
again, idle memory is, and pooled outputs hold what fresh ones hold."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import normdrop.nn.functional as ndF
from normdrop.nn.kernels.numba_cpu import memory

LARGE = (64, 32, 32, 32)  # 8 MiB of float32: above POOL_MIN_BYTES


@pytest.fixture
def pool(monkeypatch):
    fresh = memory._OutputPool(64 << 20)
    monkeypatch.setattr(memory, "_output_pool", fresh)
    return fresh


def test_a_live_output_is_never_handed_out_again(pool):
    x = torch.randn(LARGE)
    first = memory._empty_like(x, memory._CONTIGUOUS)[0]
    view = first[3:5]  # a view keeps the memory in use too
    del first
    second = memory._empty_like(x, memory._CONTIGUOUS)[0]
    assert second.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()
    storage = second.untyped_storage()
    del second, view
    third = memory._empty_like(x, memory._CONTIGUOUS)[0]
    assert third.untyped_storage().data_ptr() != storage.data_ptr()  # the storage alone keeps it in use


def test_an_idle_buffer_is_reused(pool):
    x = torch.randn(LARGE)
    first = memory._empty_like(x, memory._CONTIGUOUS)[0]
    address = first.data_ptr()
    del first
    second = memory._empty_like(x, memory._CONTIGUOUS)[0]
    assert second.data_ptr() == address
    assert pool.idle_bytes() == 0
    del second
    assert pool.idle_bytes() == x.numel() * 4


def test_an_idle_buffer_behind_one_in_use_is_reused(pool):
    # the pool holds [in use, idle]: taking finds the second one (by position, not by comparing arrays)
    x = torch.randn(LARGE)
    kept = memory._empty_like(x, memory._CONTIGUOUS)[0]
    freed = memory._empty_like(x, memory._CONTIGUOUS)[0]
    address = freed.data_ptr()
    del freed
    again = memory._empty_like(x, memory._CONTIGUOUS)[0]
    assert again.data_ptr() == address != kept.data_ptr()
    y = ndF.dropout(x, 0.3, training=True)  # and through the public API, with two buffers in the pool
    del y
    z = ndF.dropout(x, 0.3, training=True)
    assert z.data_ptr() not in (kept.data_ptr(), again.data_ptr())


def test_small_outputs_and_a_disabled_pool_use_fresh_memory(monkeypatch):
    small = torch.randn(64, 128)
    assert memory._empty_array(tuple(small.shape), memory.np.float32).base is None
    monkeypatch.setattr(memory, "_output_pool", memory._OutputPool(0))
    x = torch.randn(LARGE)
    out = memory._empty_like(x, memory._CONTIGUOUS)[0]
    assert memory._output_pool.buffers == []
    assert out.shape == x.shape


@pytest.mark.parametrize("idle", ["first", "second"])
def test_the_limit_evicts_idle_buffers_and_never_those_in_use(monkeypatch, idle):
    pool = memory._OutputPool(20 << 20)  # room for two 8 MiB buffers
    monkeypatch.setattr(memory, "_output_pool", pool)
    x = torch.randn(LARGE)
    outputs = [memory._empty_like(x, memory._CONTIGUOUS)[0] for _ in range(2)]
    c = memory._empty_like(x, memory._CONTIGUOUS)[0]  # over the limit with both in use: not pooled
    assert len(pool.buffers) == 2 and len({outputs[0].data_ptr(), outputs[1].data_ptr(), c.data_ptr()}) == 3
    kept = outputs.pop(1 if idle == "first" else 0)
    del outputs
    gc.collect()
    y = torch.randn(2, *LARGE)  # 16 MiB: evicts the idle buffer, keeps the one in use
    big = memory._empty_like(y, memory._CONTIGUOUS)[0]
    assert sum(buffer.nbytes for buffer in pool.buffers) <= pool.limit
    assert [buffer.nbytes for buffer in pool.buffers] == [x.numel() * 4]  # the buffer in use, still there
    kept.fill_(1.0)
    big.fill_(2.0)
    assert torch.all(kept == 1.0)


def test_pooled_outputs_equal_fresh_ones(pool, monkeypatch):
    x = torch.randn(LARGE, requires_grad=True)
    grad = torch.randn(LARGE)
    results = []
    for limit in (64 << 20, 0):
        monkeypatch.setattr(memory, "_output_pool", memory._OutputPool(limit))
        runs = []
        for _ in range(3):  # reuses the buffers of earlier calls (dirty memory)
            torch.manual_seed(5)
            y = ndF.dropout(x, 0.3, training=True)
            (gx,) = torch.autograd.grad(y, x, grad)
            mean, var = torch.zeros(32), torch.ones(32)
            z = ndF.batch_norm(x.detach(), mean, var, training=True)
            runs.append((y.detach().clone(), gx.clone(), z.clone(), mean.clone()))
            del y, gx, z
        results.append(runs)
    for pooled, fresh in zip(results[0], results[1], strict=True):
        for a, b in zip(pooled, fresh, strict=True):
            assert torch.equal(a, b)


def test_threads_never_share_a_buffer(pool):
    x = torch.randn(LARGE)
    live: list[list[int]] = [[], []]
    errors: list[str] = []

    def work(slot: int) -> None:
        try:
            take(slot)
        except Exception as error:  # an exception in a thread would only warn
            errors.append(repr(error))

    def take(slot: int) -> None:
        held = []
        for step in range(30):
            out = memory._empty_like(x, memory._CONTIGUOUS)[0]
            held.append(out)
            live[slot].append(out.data_ptr())
            if step % 3 == 2:  # forget the addresses before the outputs go
                live[slot].clear()
                held.clear()
            if set(live[0]) & set(live[1]):
                errors.append("two live outputs share a buffer")

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


def test_a_bad_pool_size_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(memory.POOL_ENV, "lots")
    with pytest.raises(ValueError, match="NORMDROP_OUTPUT_POOL_MB='lots'"):
        memory._pool_limit()
    monkeypatch.setenv(memory.POOL_ENV, "-1")
    with pytest.raises(ValueError, match=">= 0"):
        memory._pool_limit()
    monkeypatch.setenv(memory.POOL_ENV, "0.5")
    assert memory._pool_limit() == 1 << 19
