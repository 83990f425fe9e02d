"""The store's writer lock: no two SQLite connections write to or checkpoint a store at the same moment (the
WAL-reset bug of SQLite 3.7.0-3.51.2 needs exactly that; normdrop/store.py's module docstring). The lock is proven
by holding it and watching each kind of writer wait: a save, a claim, a lease heartbeat, a writer's close. A slow
stress test then runs several processes saving large runs (frequent checkpoints) with heartbeats and a reader, and
checks the file whole."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from normdrop.spec import RunResult, RunSpec
from normdrop.store import LeaseKeeper, Store, StoreError, WriterLock, check_store, writer_lock_path

WAIT_S = 0.6
"""How long a writer must stay blocked while the lock is held (it would finish in milliseconds otherwise)."""


def _result(seed: int, blob_bytes: int = 0) -> RunResult:
    spec = RunSpec(dataset="blobs", steps=20, eval_every=10, seed=seed)
    artifacts = {"weights": bytes(seed % 251 for _ in range(blob_bytes))} if blob_bytes else {}
    return RunResult(
        run_id=spec.run_id,
        spec=spec,
        status="finished",
        metrics=[(step, "loss", float(seed + step)) for step in range(50)],
        artifacts=artifacts,
        wall_time=1.0,
    )


def _blocked_while_held(path: Path, action) -> None:
    """``action`` (in a thread) does not finish while another holder has the writer lock, and does once it is
    released."""
    holder = WriterLock(path)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as error:  # re-raised in the test's thread
            errors.append(error)

    with holder.held():
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(WAIT_S)
        assert thread.is_alive(), "the writer went ahead while another connection held the writer lock"
    thread.join(30)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def test_a_save_waits_for_the_writer_lock(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).close()
    result = _result(1)

    def save() -> None:
        with Store(path, quick_check=False) as store:
            assert store.save(result)

    _blocked_while_held(path, save)
    with Store(path, readonly=True) as store:
        assert store.has(result.run_id)
    assert writer_lock_path(path).exists()


def test_a_claim_waits_for_the_writer_lock(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).close()

    def claim() -> None:
        with Store(path, quick_check=False) as store:
            assert store.claim(["a", "b"], "me:1:x") == ["a", "b"]

    _blocked_while_held(path, claim)
    with Store(path, readonly=True) as store:
        assert set(store.leases()) == {"a", "b"}


def test_a_writers_close_waits_for_the_writer_lock(tmp_path: Path) -> None:
    """The last connection to close checkpoints the WAL into the file: a writer's close is under the lock too."""
    path = tmp_path / "s.sqlite"
    opened, closed = threading.Event(), threading.Event()

    def open_then_close() -> None:
        store = Store(path)
        store.save(_result(1))
        opened.set()
        time.sleep(0.2)  # the test takes the lock meanwhile
        store.close()
        closed.set()

    thread = threading.Thread(target=open_then_close, daemon=True)
    thread.start()
    assert opened.wait(30)
    with WriterLock(path).held():
        assert not closed.wait(WAIT_S)
    assert closed.wait(30)
    thread.join()


def test_lease_heartbeats_wait_for_the_writer_lock(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        store.claim(["a"], "me:1:x")
        first = store.leases()["a"][1]
        with LeaseKeeper(path, "me:1:x", lease_seconds=0.08):
            time.sleep(0.3)
            beaten = store.leases()["a"][1]
            assert beaten > first  # it beats when free
            with WriterLock(path).held():
                time.sleep(0.1)  # a beat that started before the lock was taken has committed by now
                held_at = store.leases()["a"][1]
                time.sleep(WAIT_S)
                assert store.leases()["a"][1] == held_at  # no heartbeat committed while the lock was held
            time.sleep(0.3)
            assert store.leases()["a"][1] > held_at  # and it resumes


def test_a_read_only_store_takes_no_lock_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).close()
    with WriterLock(path).held(), Store(path, readonly=True) as store:  # would block if it took the lock
        assert store.completed_ids() == set()
        with pytest.raises(StoreError, match="read-only"):
            store.save(_result(2))


def test_a_lock_held_too_long_is_a_one_line_store_error(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).close()
    with WriterLock(path).held(), pytest.raises(StoreError, match=r"writer lock for over 0\.2 s"):
        Store(path, busy_timeout=0.2)


# ---- stress: processes writing large runs, heartbeats, a reader ---------------------------------------------


def _writer(path: str, first_seed: int, runs: int, blob_bytes: int) -> None:
    owner = f"stress:{first_seed}:w"
    with Store(path, quick_check=False) as store, LeaseKeeper(path, owner, lease_seconds=0.02):
        store.claim([_result(first_seed + i).run_id for i in range(runs)], owner)
        # a small auto-checkpoint threshold: a checkpoint after nearly every commit, the pattern the race needs
        store._connection.execute("PRAGMA wal_autocheckpoint = 16")
        for i in range(runs):
            store.save(_result(first_seed + i, blob_bytes))
        store.release(owner)


@pytest.mark.slow
def test_many_writers_with_heartbeats_and_a_reader_leave_a_sound_store(tmp_path: Path) -> None:
    path = tmp_path / "stress.sqlite"
    Store(path).close()
    writers, runs, blob = 4, 25, 300_000
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_writer, args=(str(path), 1000 * w, runs, blob)) for w in range(writers)]
    for process in processes:
        process.start()
    seen = 0
    while any(process.is_alive() for process in processes):
        with Store(path, readonly=True, quick_check=False) as reader:
            seen = max(seen, len(reader.completed_ids()))
        time.sleep(0.05)
    for process in processes:
        process.join()
        assert process.exitcode == 0
    report = check_store(path)
    assert report.ok, report.lines()
    with Store(path, readonly=True) as store:
        assert len(store.completed_ids()) == writers * runs >= seen
        assert store.artifact(_result(3001).run_id, "weights") == _result(3001, blob).artifacts["weights"]
        assert store.leases() == {}
