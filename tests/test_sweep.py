"""Sweep files and sweeps: grid expansion, clear errors, reuse, failures, resume after SIGKILL, Ray."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from normdrop.spec import RunResult, RunSpec
from normdrop.store import Store
from normdrop.sweep import SweepError, SweepFileError, WorkerPool, expand_sweep_file, load_sweep_file, run_sweep

TESTS_DIR = Path(__file__).parent
SLEEP_ENV = "NORMDROP_TEST_RUN_SLEEP"
PID_DIR_ENV = "NORMDROP_TEST_PID_DIR"
FAILING_WIDTH = 13  # fake_run raises for this width
CRASHING_WIDTH = 14  # fake_run kills its own process for this width


def fake_run(spec: RunSpec) -> RunResult:
    """Stands in for the trainer in worker processes: one ``batch_loss`` per step, diverges when lr >= 1.

    Sleeps ``$NORMDROP_TEST_RUN_SLEEP`` seconds and notes its pid in ``$NORMDROP_TEST_PID_DIR`` when set.
    """
    if PID_DIR_ENV in os.environ:
        (Path(os.environ[PID_DIR_ENV]) / str(os.getpid())).touch()
    time.sleep(float(os.environ.get(SLEEP_ENV, "0")))
    if spec.width == FAILING_WIDTH:
        raise RuntimeError(f"unlucky width {spec.width}")
    if spec.width == CRASHING_WIDTH:
        os._exit(3)
    diverged = spec.lr >= 1.0
    steps = 2 if diverged else spec.steps
    return RunResult(
        run_id=spec.run_id,
        spec=spec,
        status="diverged" if diverged else "finished",
        diverged_step=steps if diverged else None,
        metrics=[(step, "batch_loss", spec.lr / (step + 1)) for step in range(steps)],
        summary={"test_accuracy": None if diverged else 0.5 + spec.seed / 100, "diverged": diverged},
        wall_time=0.01,
    )


def write_sweep_file(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---- sweep files ---------------------------------------------------------------------------------------


def test_grid_is_the_cartesian_product_times_seeds(tmp_path: Path) -> None:
    path = write_sweep_file(
        tmp_path,
        """
        seeds = 3
        name = "bn-lr"

        [fixed]
        dataset = "blobs"
        steps = 50

        [grid]
        lr = [0.001, 0.01, 0.1]
        norm = ["none", "batch"]
        """,
    )
    specs = load_sweep_file(path)

    assert len(specs) == 3 * 2 * 3
    assert len({spec.run_id for spec in specs}) == len(specs)
    assert {(spec.lr, spec.norm, spec.seed) for spec in specs} == {
        (lr, norm, seed) for lr in (0.001, 0.01, 0.1) for norm in ("none", "batch") for seed in range(3)
    }
    assert all(spec.dataset == "blobs" and spec.steps == 50 for spec in specs)
    assert [(spec.lr, spec.norm, spec.seed) for spec in specs[:4]] == [
        (0.001, "none", 0),
        (0.001, "none", 1),
        (0.001, "none", 2),
        (0.001, "batch", 0),
    ]


def test_seeds_as_a_list_and_seedless_studies() -> None:
    specs = expand_sweep_file({"seeds": [5, 7], "grid": {"width": [8, 16]}})
    assert [(spec.width, spec.seed) for spec in specs] == [(8, 5), (8, 7), (16, 5), (16, 7)]
    assert [spec.seed for spec in expand_sweep_file({"fixed": {"seed": 4}})] == [4]
    assert expand_sweep_file({}) == [RunSpec()]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[fixed]\nlr = 0.1\nlr = 0.2\n", "not valid TOML"),
        ("[fixed\n", "not valid TOML"),
        ("[fixed]\nlearning_rate = 0.1\n", "[fixed] learning_rate = 0.1: unknown spec field"),
        ("[grid]\nnorms = ['batch']\n", "[grid] norms = ['batch']: unknown spec field"),
        ("repeats = 3\n", "repeats = 3: unknown top-level key"),
        ("[fixed]\nlr = 'fast'\n", "[fixed] lr = 'fast': Input should be a valid number"),
        ("[fixed]\nnorm = 'group'\n", "[fixed] norm = 'group': Value error, unknown norm 'group'"),
        ("[grid]\ndepth = [2, 0]\n", "[grid] depth = 0: Input should be greater than or equal to 1"),
        ("[grid]\nlr = 0.1\n", "[grid] lr = 0.1: a grid axis must be a non-empty list"),
        ("[grid]\nlr = []\n", "[grid] lr = []: a grid axis must be a non-empty list"),
        ("[grid]\nlr = [0.1, 0.1]\n", "the value 0.1 is listed twice"),
        ("[fixed]\nlr = 0.1\n[grid]\nlr = [0.2]\n", "'lr' is both in [fixed] and in [grid]"),
        ("seeds = 0\n", "seeds = 0: a number of seeds must be at least 1"),
        ("seeds = [1, 'a']\n", "seeds = [1, 'a']: expected a number of seeds"),
        ("seeds = [1, 1]\n", "seeds = [1, 1]: a seed is listed twice"),
        ("seeds = [-1]\n", "seeds: seed = -1: Input should be greater than or equal to 0"),
        ("seeds = 2\n[fixed]\nseed = 3\n", "seeds = 2 and a `seed` spec field both set the seed"),
        ("[grid]\nlr = [0.1]\nseeds = 3\n", "[grid] seeds: `seeds` is a top-level key; write it before any [table]"),
        ("fixed = 3\n", "fixed = 3: expected a table [fixed]"),
        (
            "[fixed]\noptimizer = 'sgd'\nmomentum = 0.9\n[grid]\nnesterov = [false, true]\noptimizer = ['adam']\n",
            "'optimizer' is both in [fixed] and in [grid]",
        ),
        (
            "[fixed]\nmomentum = 0.9\n[grid]\noptimizer = ['sgd', 'adam']\nnesterov = [true]\n",
            "[grid] point {'optimizer': 'adam', 'nesterov': True}: Value error, nesterov=True needs optimizer='sgd'",
        ),
    ],
)
def test_bad_study_files_name_the_file_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    path = write_sweep_file(tmp_path, text)
    with pytest.raises(SweepFileError) as error:
        load_sweep_file(path)
    assert str(error.value).startswith(f"{path}: ")
    assert expected in str(error.value)


def test_missing_study_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SweepFileError, match=f"{tmp_path / 'nope.toml'}: cannot read the sweep file"):
        load_sweep_file(tmp_path / "nope.toml")


# ---- sweeps --------------------------------------------------------------------------------------------


def test_sweep_saves_every_run_and_reuses_them(tmp_path: Path) -> None:
    specs = expand_sweep_file({"seeds": 2, "fixed": {"steps": 7}, "grid": {"lr": [0.01, 0.1]}})
    store_path = tmp_path / "runs.sqlite"

    report = run_sweep(specs + specs[:1], store_path, workers=2, progress=False, run_fn=fake_run)

    assert (report.total, report.reused, report.finished, report.executed) == (4, 0, 4, 4)
    with Store(store_path) as store:
        assert store.completed_ids() == {spec.run_id for spec in specs}
        assert (store.metrics().groupby("run_id").size() == 7).all()
        assert store.result(specs[3].run_id) == fake_run(specs[3])

    again = run_sweep(specs, store_path, progress=False, run_fn=fake_run)
    assert (again.total, again.reused, again.executed) == (4, 4, 0)


def test_failed_and_diverged_runs_are_recorded_and_failures_retried(tmp_path: Path) -> None:
    specs = [RunSpec(width=8, steps=5), RunSpec(width=FAILING_WIDTH), RunSpec(width=8, lr=2.0), RunSpec(width=9)]
    store_path = tmp_path / "runs.sqlite"

    report = run_sweep(specs, store_path, workers=1, progress=False, run_fn=fake_run)

    assert (report.finished, report.diverged, report.failed) == (2, 1, 1)
    assert report.failed_ids == [specs[1].run_id]
    with Store(store_path) as store:
        (failed,) = store.runs(status="failed")
        assert failed.run_id == specs[1].run_id
        assert "RuntimeError: unlucky width 13" in failed.error
        assert "in fake_run" in failed.error  # the traceback, not only the message
        (diverged,) = store.runs(status="diverged")
        assert (diverged.run_id, diverged.diverged_step) == (specs[2].run_id, 2)

    retry = run_sweep(specs, store_path, workers=1, progress=False, run_fn=fake_run)
    assert (retry.reused, retry.executed, retry.failed) == (3, 1, 1)


def _pids_of_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, specs, **kwargs) -> set[int]:
    pid_dir = tmp_path / name
    pid_dir.mkdir()
    monkeypatch.setenv(PID_DIR_ENV, str(pid_dir))  # workers spawned from now on see it
    monkeypatch.setenv(SLEEP_ENV, "0.2")  # long enough for both workers to take a run
    report = run_sweep(specs, tmp_path / "runs.sqlite", progress=False, run_fn=fake_run, **kwargs)
    assert report.finished == len(specs)
    return {int(p.name) for p in pid_dir.iterdir()}


def test_a_worker_pool_keeps_its_workers_from_one_sweep_to_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = [RunSpec(width=8, seed=s) for s in range(4)], [RunSpec(width=9, seed=s) for s in range(4)]
    with WorkerPool(2) as pool:
        pids_first = _pids_of_sweep(tmp_path, monkeypatch, "a", first, pool=pool)
        pids_second = _pids_of_sweep(tmp_path, monkeypatch, "b", second, pool=pool)
    assert 1 <= len(pids_first) <= 2
    assert pids_second <= pids_first  # the same processes ran the second sweep
    # without a pool each sweep starts its own workers
    own_first = _pids_of_sweep(tmp_path, monkeypatch, "c", [RunSpec(width=10, seed=s) for s in range(4)], workers=2)
    own_second = _pids_of_sweep(tmp_path, monkeypatch, "d", [RunSpec(width=11, seed=s) for s in range(4)], workers=2)
    assert not own_first & own_second


def test_a_worker_pool_replaces_a_dead_worker_at_the_next_sweep(tmp_path: Path) -> None:
    store_path = tmp_path / "runs.sqlite"
    with WorkerPool(1) as pool:
        with pytest.raises(SweepError, match="a worker process died abruptly"):
            run_sweep([RunSpec(width=CRASHING_WIDTH)], store_path, progress=False, run_fn=fake_run, pool=pool)
        report = run_sweep([RunSpec(width=8)], store_path, progress=False, run_fn=fake_run, pool=pool)
    assert report.finished == 1
    with pytest.raises(ValueError, match="workers must be at least 1"):
        WorkerPool(0)


def test_a_dead_worker_stops_the_sweep_with_the_finished_runs_saved(tmp_path: Path) -> None:
    specs = [RunSpec(width=8), RunSpec(width=CRASHING_WIDTH), RunSpec(width=9)]
    store_path = tmp_path / "runs.sqlite"
    with pytest.raises(SweepError, match="a worker process died abruptly"):
        run_sweep(specs, store_path, workers=1, progress=False, run_fn=fake_run)
    with Store(store_path) as store:
        assert store.completed_ids() == {specs[0].run_id}


def test_bad_sweep_arguments_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="executor must be one of"):
        run_sweep([RunSpec()], tmp_path / "runs.sqlite", executor="slurm", run_fn=fake_run)
    with pytest.raises(TypeError, match="cannot be sent to worker processes"):
        run_sweep([RunSpec()], tmp_path / "runs.sqlite", progress=False, run_fn=lambda spec: fake_run(spec))
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'normdrop\[ray\]'"):
        run_sweep([RunSpec()], tmp_path / "runs.sqlite", executor="ray", progress=False, run_fn=fake_run)


RESUME_STEPS = 5_000  # metric rows per run: each save is a sizeable transaction for the kill to land in
RESUME_SPECS = [RunSpec(steps=RESUME_STEPS, seed=seed) for seed in range(8)]
RESUME_SWEEP = f"""
import sys
sys.path.insert(0, {str(TESTS_DIR)!r})
from test_sweep import RESUME_SPECS, fake_run
from normdrop.sweep import run_sweep
run_sweep(RESUME_SPECS, sys.argv[1], workers=2, progress=False, run_fn=fake_run)
"""


def _kill_process_group(pid: int) -> None:
    """Clean-up: SIGKILL whatever is left of a subprocess started with ``start_new_session=True``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _process_alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an orphan may wait a while to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_sweep_killed_by_sigkill_resumes_with_only_the_missing_runs(tmp_path: Path) -> None:
    store_path = tmp_path / "runs.sqlite"
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = {**os.environ, SLEEP_ENV: "0.3", PID_DIR_ENV: str(pid_dir)}
    sweep = subprocess.Popen([sys.executable, "-c", RESUME_SWEEP, str(store_path)], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        with Store(store_path) as store:
            while len(store.completed_ids()) < 3:
                assert sweep.poll() is None, "the sweep ended before it could be killed"
                assert time.monotonic() < deadline, "the sweep made no progress"
                time.sleep(0.05)
        sweep.send_signal(signal.SIGKILL)
        sweep.wait(timeout=10)

        workers = [int(path.name) for path in pid_dir.iterdir()]
        assert workers
        deadline = time.monotonic() + 15
        while any(_process_alive(pid) for pid in workers):  # orphaned workers notice and exit
            assert time.monotonic() < deadline, "pool workers outlived the killed sweep"
            time.sleep(0.1)
    finally:
        _kill_process_group(sweep.pid)

    with Store(store_path) as store:
        store.check()
        survived = store.completed_ids()
        assert 3 <= len(survived) < len(RESUME_SPECS)
        assert (store.metrics().groupby("run_id").size() == RESUME_STEPS).all()

    report = run_sweep(RESUME_SPECS, store_path, workers=2, progress=False, run_fn=fake_run)

    assert (report.reused, report.finished, report.failed) == (len(survived), len(RESUME_SPECS) - len(survived), 0)
    with Store(store_path) as store:
        store.check()
        assert store.completed_ids() == {spec.run_id for spec in RESUME_SPECS}
        assert len(store.runs()) == len(RESUME_SPECS)
        per_run = store.metrics().groupby("run_id").size()
        assert len(per_run) == len(RESUME_SPECS)
        assert (per_run == RESUME_STEPS).all()


# ---- with the real trainer -----------------------------------------------------------------------------

TINY_SWEEP = """
seeds = 2

[fixed]
dataset = "blobs"
width = 16
batch_size = 50
steps = 20
eval_every = 10
optimizer = "sgd"

[grid]
lr = [0.05, 10000.0]
"""


@pytest.mark.slow
def test_local_sweep_with_the_trainer(tmp_path: Path) -> None:
    specs = load_sweep_file(write_sweep_file(tmp_path, TINY_SWEEP))
    store_path = tmp_path / "runs.sqlite"

    report = run_sweep(specs, store_path, workers=2, progress=False)

    assert (report.finished, report.diverged, report.failed) == (2, 2, 0)
    with Store(store_path) as store:
        for run in store.runs(status="finished"):
            assert 0.0 <= run.summary["test_accuracy"] <= 1.0
            losses = store.metrics(run_ids=[run.run_id], names=["batch_loss"])
            assert losses["step"].tolist() == list(range(20))
        assert {run.spec["lr"] for run in store.runs(status="diverged")} == {10000.0}


RAY_SWEEP = """
import sys
from normdrop.sweep import load_sweep_file, run_sweep
report = run_sweep(load_sweep_file(sys.argv[1]), sys.argv[2], executor="ray", progress=False)
print("REPORT", report.finished, report.diverged, report.failed)
"""


@pytest.mark.slow
def test_ray_sweep_on_a_local_instance(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    study = write_sweep_file(tmp_path, TINY_SWEEP)
    store_path = tmp_path / "runs.sqlite"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    # A subprocess with a deadline: a Ray start that hangs fails this test instead of the whole session.
    sweep = subprocess.Popen(
        [sys.executable, "-c", RAY_SWEEP, str(study), str(store_path)],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = sweep.communicate(timeout=300)
    finally:
        _kill_process_group(sweep.pid)
    assert sweep.returncode == 0, output
    assert "REPORT 2 2 0" in output

    with Store(store_path) as store:
        assert store.completed_ids() == {spec.run_id for spec in load_sweep_file(study)}
        for run in store.runs(status="finished"):
            assert len(store.metrics(run_ids=[run.run_id], names=["batch_loss"])) == 20


def _busy_run(spec):
    """A run function that spends ~0.3 s of CPU."""
    from normdrop.spec import RunResult

    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    return RunResult(run_id=spec.run_id, spec=spec, status="finished", summary={})


def _idle_run(spec):
    """A run function that waits ~0.3 s without using the CPU."""
    from normdrop.spec import RunResult

    time.sleep(0.3)
    return RunResult(run_id=spec.run_id, spec=spec, status="finished", summary={})


def test_provenance_records_cpu_time_and_load_beside_the_wall_time():
    """A run that waits and one that computes take the same wall time; only the CPU time tells them apart."""
    from normdrop.spec import RunSpec
    from normdrop.sweep import execute_run

    spec = RunSpec(dataset="blobs", steps=3)
    _, busy = execute_run(spec, _busy_run)
    _, idle = execute_run(spec, _idle_run)
    assert busy.versions["accounting"]["cpu_seconds"] >= 0.25
    assert idle.versions["accounting"]["cpu_seconds"] < 0.1
    load = busy.versions["accounting"]["load_average"]
    assert load is None or (len(load) == 3 and all(value >= 0 for value in load))


TRAINED_LOG_ENV = "NORMDROP_TEST_TRAINED_LOG"


def logged_run(spec: RunSpec) -> RunResult:
    """fake_run that appends the run id to ``$NORMDROP_TEST_TRAINED_LOG``: counts how often each run is trained."""
    with open(os.environ[TRAINED_LOG_ENV], "a") as log:
        log.write(spec.run_id + "\n")
    return fake_run(spec)


LEASE_SPECS = [RunSpec(width=8, seed=seed) for seed in range(6)]
LEASE_SWEEP = f"""
import sys
sys.path.insert(0, {str(TESTS_DIR)!r})
from test_sweep import LEASE_SPECS, logged_run
from normdrop.sweep import run_sweep
report = run_sweep(LEASE_SPECS, sys.argv[1], workers=1, progress=False, run_fn=logged_run)
print(report.executed, report.reused)
"""


def test_two_concurrent_sweeps_never_train_one_run_twice(tmp_path: Path) -> None:
    store_path, log = tmp_path / "runs.sqlite", tmp_path / "trained.log"
    Store(store_path).close()
    env = {**os.environ, SLEEP_ENV: "0.4", TRAINED_LOG_ENV: str(log)}
    sweeps = [
        subprocess.Popen(
            [sys.executable, "-c", LEASE_SWEEP, str(store_path)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [sweep.communicate(timeout=240)[0].split() for sweep in sweeps]
    assert [sweep.returncode for sweep in sweeps] == [0, 0]
    trained = log.read_text().split()
    assert sorted(trained) == sorted(spec.run_id for spec in LEASE_SPECS)  # each run trained exactly once
    assert sum(int(executed) for executed, _ in outputs) == len(LEASE_SPECS)
    with Store(store_path) as store:
        assert store.completed_ids() == {spec.run_id for spec in LEASE_SPECS}
        assert store.leases() == {}  # both released theirs


def test_a_dead_owners_leases_are_taken_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGKILLed sweep on this host: its leases are taken at once (its pid is gone). A sweep elsewhere that stopped
    beating: its leases lapse after NORMDROP_LEASE_SECONDS, and only then are its runs trained here."""
    store_path, log = tmp_path / "runs.sqlite", tmp_path / "trained.log"
    monkeypatch.setenv(TRAINED_LOG_ENV, str(log))
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    victim.kill()
    victim.wait()
    with Store(store_path) as store:
        assert store.claim([LEASE_SPECS[0].run_id], f"{socket.gethostname()}:{victim.pid}:dead") == [
            LEASE_SPECS[0].run_id
        ]
        assert store.claim([LEASE_SPECS[1].run_id], "other-machine:123:alive") == [LEASE_SPECS[1].run_id]
        assert store.claim([spec.run_id for spec in LEASE_SPECS[:2]], "someone-else") == [LEASE_SPECS[0].run_id]
        store.release("someone-else")
    monkeypatch.setenv("NORMDROP_LEASE_SECONDS", "1.5")
    started = time.monotonic()
    report = run_sweep(LEASE_SPECS[:2], store_path, workers=1, progress=False, run_fn=logged_run)
    assert report.executed == 2 and sorted(log.read_text().split()) == sorted(s.run_id for s in LEASE_SPECS[:2])
    assert time.monotonic() - started >= 1.0  # the other machine's run waited for its lease to lapse
    monkeypatch.setenv("NORMDROP_LEASE_SECONDS", "0")
    with pytest.raises(ValueError, match="NORMDROP_LEASE_SECONDS"):
        run_sweep([RunSpec(width=8, seed=99)], store_path, workers=1, progress=False, run_fn=logged_run)
