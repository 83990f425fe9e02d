"""A corpus of bad inputs over every command (issue 12): bad flags, bad study files, damaged, foreign, read-only,
missing stores and paths, bad environment values. Each case must exit non-zero without a traceback, print one
line naming what is wrong, and leave every store byte for byte as it was.

The commands run in-process (typer's CliRunner); every case fails before any training starts.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normdrop.cli import app
from normdrop.spec import RunResult, RunSpec
from normdrop.store import Store

PAGE = 4096


def _make_stores(root: Path) -> dict[str, Path]:
    """good (3 runs), foreign SQLite, normdrop id but another schema, damaged data page, damaged index page, not
    SQLite, a directory, a plain file (to put paths under), study files."""
    paths: dict[str, Path] = {}
    good = root / "good.sqlite"
    with Store(good) as store:
        for seed in range(3):
            spec = RunSpec(dataset="blobs", steps=20, eval_every=10, seed=seed)
            metrics = [(step, name, 0.5 + seed) for step in range(0, 200) for name in ("a", "b", "c")]
            store.save(RunResult(run_id=spec.run_id, spec=spec, status="finished", metrics=metrics, wall_time=1.0))
    connection = sqlite3.connect(good)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    paths["good"] = good
    pages = {}
    connection = sqlite3.connect(good)
    pages = dict(connection.execute("SELECT name, rootpage FROM sqlite_master"))
    page_count = connection.execute("PRAGMA page_count").fetchone()[0]
    connection.close()
    noise = random.Random(0)
    for name, page in (("damaged_data", page_count), ("damaged_index", pages["metrics_run_name_step"])):
        data = bytearray(good.read_bytes())
        data[(page - 1) * PAGE : page * PAGE] = bytes(noise.randrange(256) for _ in range(PAGE))
        paths[name] = root / f"{name}.sqlite"
        paths[name].write_bytes(bytes(data))
    foreign = root / "foreign.sqlite"
    connection = sqlite3.connect(foreign)
    connection.execute("CREATE TABLE t (x)")
    connection.commit()
    connection.close()
    paths["foreign"] = foreign
    schema = root / "schema.sqlite"
    connection = sqlite3.connect(schema)
    connection.execute("CREATE TABLE runs (run_id TEXT)")
    connection.execute(f"PRAGMA application_id = {int.from_bytes(b'NDRS', 'big')}")
    connection.execute("PRAGMA user_version = 1")
    connection.commit()
    connection.close()
    paths["schema"] = schema
    paths["notsqlite"] = root / "notes.txt"
    paths["notsqlite"].write_text("not a database\n" * 10)
    paths["dir"] = root / "adir"
    paths["dir"].mkdir()
    paths["file"] = root / "afile"
    paths["file"].write_text("x")
    return paths


STUDIES = {
    "ok": '[fixed]\ndataset = "blobs"\nsteps = 5\n',
    "toml": "[fixed\n",
    "top_key": 'bogus = 1\n[fixed]\ndataset = "blobs"\n',
    "field": '[fixed]\ndataset = "blobs"\nlearning_rate = 0.1\n',
    "lr_inf": '[fixed]\ndataset = "blobs"\nlr = inf\n',
    "lr_1e400": '[fixed]\ndataset = "blobs"\n[grid]\nlr = [0.1, 1e400]\n',
    "lr_nan": '[fixed]\ndataset = "blobs"\nlr = nan\n',
    "axis_scalar": '[fixed]\ndataset = "blobs"\n[grid]\nlr = 0.1\n',
    "axis_empty": '[fixed]\ndataset = "blobs"\n[grid]\nlr = []\n',
    "axis_dup": '[fixed]\ndataset = "blobs"\n[grid]\nlr = [0.1, 0.1]\n',
    "seeds_zero": 'seeds = 0\n[fixed]\ndataset = "blobs"\n',
    "seeds_text": 'seeds = "three"\n[fixed]\ndataset = "blobs"\n',
    "seeds_in_fixed": '[fixed]\ndataset = "blobs"\nseeds = 3\n',
    "seed_and_seeds": 'seeds = 2\n[fixed]\ndataset = "blobs"\nseed = 1\n',
    "both": '[fixed]\ndataset = "blobs"\nlr = 0.1\n[grid]\nlr = [0.1, 0.2]\n',
    "ghost": '[fixed]\ndataset = "blobs"\nnorm = "ghost"\n',
    "steps": '[fixed]\ndataset = "blobs"\nsteps = 1000000000000\n',
    "options": '[fixed]\ndataset = "blobs"\ndataset_options = { nosie = 1.0 }\n',
    "norm_options": '[fixed]\ndataset = "blobs"\nnorm = "batch"\nnorm_options = { ghost_batch_size = 4 }\n',
    "fixed_scalar": "fixed = 3\n",
    "bad_norm": '[fixed]\ndataset = "blobs"\nnorm = "bogus"\n',
    "utf": None,  # invalid UTF-8, written as bytes below
}

T = ["train", "--dataset", "blobs", "--steps", "5", "-q"]

# (name, argv with {placeholders}, extra environment, regex the one line must match)
CASES: list[tuple[str, list[str], dict[str, str], str]] = [
    # ---- train: flags
    ("train-lr-inf", [*T, "--lr", "inf"], {}, r"--lr='inf'.*finite"),
    ("train-lr-1e400", [*T, "--lr", "1e400"], {}, r"--lr='1e400'.*finite"),
    ("train-lr-nan", [*T, "--lr", "nan"], {}, r"--lr='nan'.*finite"),
    ("train-lr-negative", [*T, "--lr", "-1"], {}, r"--lr.*greater than 0"),
    ("train-lr-text", [*T, "--lr", "abc"], {}, r"--lr='abc'.*number"),
    ("train-diverge-inf", [*T, "--diverge-loss", "inf"], {}, r"--diverge-loss.*finite"),
    ("train-steps-huge", ["train", "--dataset", "blobs", "--steps", str(10**12)], {}, r"--steps.*less than or equal"),
    ("train-steps-zero", ["train", "--dataset", "blobs", "--steps", "0"], {}, r"--steps.*greater than or equal"),
    ("train-steps-text", ["train", "--steps", "many"], {}, r"--steps='many'.*integer"),
    ("train-norm-unknown", [*T, "--norm", "bogus"], {}, r"unknown norm 'bogus'"),
    ("train-ghost-no-size", [*T, "--norm", "ghost"], {}, r"ghost_batch_size"),
    ("train-ghost-size-zero", [*T, "--norm", "ghost", "--norm-options", "ghost_batch_size=0"], {}, r"ghost"),
    ("train-ghost-size-inf", [*T, "--norm", "ghost", "--norm-options", "ghost_batch_size=inf"], {}, r"finite"),
    ("train-norm-options-nokey", [*T, "--norm", "ghost", "--norm-options", "=3"], {}, r"KEY=VALUE"),
    ("train-norm-options-noeq", [*T, "--norm", "ghost", "--norm-options", "ghost_batch_size"], {}, r"KEY=VALUE"),
    ("train-norm-options-text", [*T, "--norm", "ghost", "--norm-options", "ghost_batch_size=ten"], {}, r"number"),
    ("train-norm-options-unknown", [*T, "--norm", "batch", "--norm-options", "size=3"], {}, r"size"),
    ("train-norm-none-options", [*T, "--norm-options", "eps=0.1"], {}, r"norm='none' takes no"),
    (
        "train-ghost-torch",
        [*T, "--norm", "ghost", "--layers", "torch", "--norm-options", "ghost_batch_size=5"],
        {},
        r"no torch implementation",
    ),
    ("train-dataset-option-unknown", [*T, "--dataset-options", "nosie=1"], {}, r"nosie"),
    ("train-dataset-option-negative", [*T, "--dataset-options", "noise=-1"], {}, r"noise must be"),
    (
        "train-dataset-option-none",
        ["train", "--dataset", "mnist1d", "--dataset-options", "noise=1"],
        {},
        r"takes no options",
    ),
    ("train-dataset-unknown", ["train", "--dataset", "bogus"], {}, r"unknown dataset 'bogus'"),
    ("train-dropout-range", [*T, "--dropout", "1.5"], {}, r"--dropout.*less than 1"),
    ("train-dropout-kind", [*T, "--dropout-kind", "bogus"], {}, r"unknown dropout kind"),
    (
        "train-dropout-options",
        [*T, "--dropout", "0.1", "--dropout-kind", "gaussian", "--dropout-options", "block_size=3"],
        {},
        r"block_size",
    ),
    ("train-dropout-none-options", [*T, "--dropout-kind", "none", "--dropout-options", "p=3"], {}, r"takes no"),
    ("train-model", [*T, "--model", "cnn5"], {}, r"--model='cnn5'"),
    ("train-momentum", [*T, "--momentum", "1"], {}, r"--momentum.*less than 1"),
    ("train-warmup", [*T, "--warmup-steps", "30"], {}, r"warmup_steps=30 must be smaller"),
    ("train-probe-name", [*T, "--probes", "Bad Name"], {}, r"lower_snake_case"),
    ("train-nesterov", [*T, "--nesterov"], {}, r"nesterov=True needs"),
    ("train-label-noise", [*T, "--label-noise", "1"], {}, r"--label-noise.*less than 1"),
    ("train-batch-size", [*T, "--batch-size", "0"], {}, r"--batch-size.*greater than or equal"),
    ("train-threads", [*T, "--threads", "0"], {}, r"threads"),
    ("train-unknown-flag", [*T, "--bogus", "1"], {}, r"No such option.*--bogus"),
    ("train-data-root", [*T, "--data-root", "{tmp}/missing"], {}, r"--data-root .*not a directory"),
    # ---- train: stores (checked before training)
    ("train-store-under-file", [*T, "--store", "{file}/s.sqlite"], {}, r"afile is a file, not a directory"),
    ("train-store-foreign", [*T, "--store", "{foreign}"], {}, r"not a normdrop run store"),
    ("train-store-schema", [*T, "--store", "{schema}"], {}, r"not its schema"),
    ("train-store-damaged", [*T, "--store", "{damaged_data}"], {}, r"damaged"),
    ("train-store-damaged-index", [*T, "--store", "{damaged_index}"], {}, r"damaged"),
    ("train-store-notsqlite", [*T, "--store", "{notsqlite}"], {}, r"not a SQLite database"),
    ("train-store-dir", [*T, "--store", "{dir}"], {}, r"is a directory"),
    # ---- environment
    ("train-env-backend", [*T, "--norm", "batch"], {"NORMDROP_BACKEND": "bogus"}, r"\$NORMDROP_BACKEND='bogus'"),
    ("train-env-fastpath", T, {"NORMDROP_FASTPATH": "maybe"}, r"\$NORMDROP_FASTPATH='maybe'"),
    (
        "sweep-env-backend",
        ["sweep", "{study_ok}", "--store", "{tmp}/new.sqlite"],
        {"NORMDROP_BACKEND": "bogus"},
        r"\$NORMDROP_BACKEND='bogus' is not one of auto, composite, numba",
    ),
    (
        "sweep-env-fastpath",
        ["sweep", "{study_ok}", "--store", "{tmp}/new.sqlite"],
        {"NORMDROP_FASTPATH": "2"},
        r"\$NORMDROP_FASTPATH",
    ),
    ("runs-env-backend", ["runs", "--store", "{good}"], {"NORMDROP_BACKEND": "numpy"}, r"NORMDROP_BACKEND"),
    ("runs-env-store-missing", ["runs"], {"NORMDROP_STORE": "{tmp}/nowhere.sqlite"}, r"no run store here"),
    (
        "export-env-store-foreign",
        ["export", "--format", "csv", "--out", "{tmp}/out"],
        {"NORMDROP_STORE": "{foreign}"},
        r"not a normdrop run store",
    ),
    (
        "study-env-backend",
        ["study", "--quick", "--store", "{tmp}/new.sqlite", "--out", "{tmp}/rep"],
        {"NORMDROP_BACKEND": "cuda"},
        r"NORMDROP_BACKEND",
    ),
    # ---- sweep: study files
    ("sweep-missing-file", ["sweep", "{tmp}/nope.toml", "--store", "{good}"], {}, r"nope.toml: cannot read"),
    ("sweep-study-dir", ["sweep", "{dir}", "--store", "{good}"], {}, r"adir: cannot read"),
    *[
        (f"sweep-study-{key}", ["sweep", f"{{study_{key}}}", "--store", "{good}"], {}, pattern)
        for key, pattern in [
            ("toml", r"not valid TOML"),
            ("top_key", r"bogus = 1: unknown top-level key"),
            ("field", r"learning_rate = 0.1: unknown spec field"),
            ("lr_inf", r"lr = inf.*finite"),
            ("lr_1e400", r"\[grid\] lr = inf.*finite"),
            ("lr_nan", r"lr = nan.*finite"),
            ("axis_scalar", r"grid axis must be a non-empty list"),
            ("axis_empty", r"grid axis must be a non-empty list"),
            ("axis_dup", r"listed twice"),
            ("seeds_zero", r"at least 1"),
            ("seeds_text", r"expected a number of seeds"),
            ("seeds_in_fixed", r"top-level key"),
            ("seed_and_seeds", r"both set the seed"),
            ("both", r"both in \[fixed\] and in \[grid\]"),
            ("ghost", r"ghost_batch_size"),
            ("steps", r"steps = 1000000000000.*less than or equal"),
            ("options", r"nosie"),
            ("norm_options", r"ghost_batch_size"),
            ("fixed_scalar", r"expected a table \[fixed\]"),
            ("bad_norm", r"unknown norm 'bogus'"),
            ("utf", r"not valid TOML"),
        ]
    ],
    # ---- sweep: stores and flags
    ("sweep-store-foreign", ["sweep", "{study_ok}", "--store", "{foreign}"], {}, r"not a normdrop run store"),
    ("sweep-store-schema", ["sweep", "{study_ok}", "--store", "{schema}"], {}, r"missing column"),
    ("sweep-store-damaged", ["sweep", "{study_ok}", "--store", "{damaged_data}"], {}, r"damaged"),
    ("sweep-store-damaged-index", ["sweep", "{study_ok}", "--store", "{damaged_index}"], {}, r"normdrop check"),
    ("sweep-store-notsqlite", ["sweep", "{study_ok}", "--store", "{notsqlite}"], {}, r"not a SQLite database"),
    ("sweep-store-dir", ["sweep", "{study_ok}", "--store", "{dir}"], {}, r"is a directory"),
    ("sweep-store-under-file", ["sweep", "{study_ok}", "--store", "{file}/s.sqlite"], {}, r"is a file, not a dir"),
    ("sweep-workers", ["sweep", "{study_ok}", "--store", "{good}", "--workers", "0"], {}, r"--workers"),
    ("sweep-executor", ["sweep", "{study_ok}", "--store", "{good}", "--executor", "slurm"], {}, r"--executor"),
    ("sweep-no-study", ["sweep", "--store", "{good}"], {}, r"Missing argument 'sweep_file'"),
    # ---- runs
    ("runs-missing", ["runs", "--store", "{tmp}/nowhere.sqlite"], {}, r"no run store here"),
    ("runs-foreign", ["runs", "--store", "{foreign}"], {}, r"not a normdrop run store"),
    ("runs-schema", ["runs", "--store", "{schema}"], {}, r"not its schema"),
    ("runs-damaged", ["runs", "--store", "{damaged_data}"], {}, r"damaged"),
    ("runs-damaged-index", ["runs", "--store", "{damaged_index}"], {}, r"damaged"),
    ("runs-notsqlite", ["runs", "--store", "{notsqlite}"], {}, r"not a SQLite database"),
    ("runs-dir", ["runs", "--store", "{dir}"], {}, r"is a directory"),
    ("runs-under-file", ["runs", "--store", "{file}/s.sqlite"], {}, r"no run store here"),
    ("runs-status", ["runs", "--store", "{good}", "--status", "bogus"], {}, r"--status"),
    ("runs-filter-field", ["runs", "--store", "{good}", "--filter", "nofield=1"], {}, r"unknown spec field"),
    ("runs-filter-syntax", ["runs", "--store", "{good}", "--filter", "norm"], {}, r"FIELD=VALUE"),
    ("runs-show-unknown", ["runs", "show", "ffffffffffffffff", "--store", "{good}"], {}, r"no run with id"),
    ("runs-show-no-id", ["runs", "show", "--store", "{good}"], {}, r"show RUN_ID"),
    ("runs-bogus-action", ["runs", "delete", "x", "--store", "{good}"], {}, r"show RUN_ID"),
    # ---- export
    (
        "export-missing",
        ["export", "--format", "csv", "--out", "{tmp}/o", "--store", "{tmp}/n.sqlite"],
        {},
        r"no run store here",
    ),
    (
        "export-out-file",
        ["export", "--format", "csv", "--out", "{file}", "--store", "{good}"],
        {},
        r"--out .*afile: is a file",
    ),
    (
        "export-out-under-file",
        ["export", "--format", "csv", "--out", "{file}/sub", "--store", "{good}"],
        {},
        r"afile is a file, not a directory",
    ),
    ("export-format", ["export", "--format", "xml", "--out", "{tmp}/o", "--store", "{good}"], {}, r"--format"),
    ("export-no-out", ["export", "--format", "csv", "--store", "{good}"], {}, r"Missing option '--out'"),
    (
        "export-foreign",
        ["export", "--format", "csv", "--out", "{tmp}/o", "--store", "{foreign}"],
        {},
        r"not a normdrop",
    ),
    ("export-schema", ["export", "--format", "csv", "--out", "{tmp}/o", "--store", "{schema}"], {}, r"schema"),
    ("export-damaged", ["export", "--format", "csv", "--out", "{tmp}/o", "--store", "{damaged_data}"], {}, r"damaged"),
    (
        "export-notsqlite",
        ["export", "--format", "csv", "--out", "{tmp}/o", "--store", "{notsqlite}"],
        {},
        r"not a SQLite",
    ),
    # ---- check
    ("check-missing", ["check", "--store", "{tmp}/n.sqlite"], {}, r"no run store here"),
    ("check-foreign", ["check", "--store", "{foreign}"], {}, r"not a normdrop run store"),
    ("check-schema", ["check", "--store", "{schema}"], {}, r"not its schema"),
    ("check-damaged", ["check", "--store", "{damaged_data}"], {}, r"damaged.*runs\s+still read whole"),
    ("check-damaged-index", ["check", "--store", "{damaged_index}"], {}, r"damaged.*3 of 3 runs\s+still read"),
    ("check-notsqlite", ["check", "--store", "{notsqlite}"], {}, r"not a SQLite database"),
    ("check-dir", ["check", "--store", "{dir}"], {}, r"is a directory"),
    # ---- study
    (
        "study-out-file",
        ["study", "--quick", "--out", "{file}", "--store", "{tmp}/new.sqlite"],
        {},
        r"--out .*is a file",
    ),
    (
        "study-out-under-file",
        ["study", "--quick", "--out", "{file}/rep", "--store", "{tmp}/new.sqlite"],
        {},
        r"is a file, not a directory",
    ),
    (
        "study-dataset",
        ["study", "--quick", "--dataset", "bogus", "--store", "{tmp}/new.sqlite"],
        {},
        r"unknown dataset 'bogus'",
    ),
    ("study-store-foreign", ["study", "--quick", "--out", "{tmp}/rep", "--store", "{foreign}"], {}, r"not a normdrop"),
    ("study-store-damaged", ["study", "--quick", "--out", "{tmp}/rep", "--store", "{damaged_data}"], {}, r"damaged"),
    (
        "study-store-under-file",
        ["study", "--quick", "--out", "{tmp}/rep", "--store", "{file}/s.sqlite"],
        {},
        r"is a file, not a directory",
    ),
    ("study-seeds", ["study", "--quick", "--seeds", "0", "--store", "{tmp}/new.sqlite"], {}, r"--seeds"),
    ("study-workers", ["study", "--quick", "--workers", "0", "--store", "{tmp}/new.sqlite"], {}, r"--workers"),
    ("study-executor", ["study", "--quick", "--executor", "mpi", "--store", "{tmp}/new.sqlite"], {}, r"--executor"),
    # ---- report
    ("report-missing", ["report", "--store", "{tmp}/n.sqlite", "--out", "{tmp}/rep"], {}, r"no run store here"),
    ("report-out-file", ["report", "--store", "{good}", "--out", "{file}"], {}, r"--out .*is a file"),
    ("report-foreign", ["report", "--store", "{foreign}", "--out", "{tmp}/rep", "-q"], {}, r"not a normdrop"),
    ("report-damaged", ["report", "--store", "{damaged_data}", "--out", "{tmp}/rep", "-q"], {}, r"damaged"),
    ("report-schema", ["report", "--store", "{schema}", "--out", "{tmp}/rep", "-q"], {}, r"not its schema"),
    ("report-dataset", ["report", "--store", "{good}", "--out", "{tmp}/rep", "--dataset", "x"], {}, r"unknown dataset"),
    ("report-seeds", ["report", "--store", "{good}", "--out", "{tmp}/rep", "--seeds", "0"], {}, r"--seeds"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    paths = _make_stores(root)
    for key, text in STUDIES.items():
        path = root / f"study_{key}.toml"
        if text is None:
            path.write_bytes(b'[fixed]\nname = "\xff\xfe"\n')
        else:
            path.write_text(text)
        paths[f"study_{key}"] = path
    paths["tmp"] = root
    return paths


def _fingerprint(root: Path) -> dict[str, str]:
    """Every file under the corpus directory by content hash, stores and their WAL files included (an empty WAL
    file, which a read-only connection may leave behind, is the same as none; -shm is SQLite's lock index)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and not path.name.endswith("-shm")
        and not (path.name.endswith("-wal") and path.stat().st_size == 0)
    }


def _message(output: str) -> str:
    """Output with click's usage box removed and whitespace collapsed (long lines wrap in the box)."""
    text = re.sub(r"[│╭╮╰╯─]", " ", output)
    return " ".join(text.split())


def test_the_corpus_has_at_least_100_cases_over_every_command() -> None:
    names = [name for name, *_ in CASES]
    assert len(names) == len(set(names)) >= 100
    assert {argv[0] for _, argv, *_ in CASES} == {"train", "sweep", "study", "report", "runs", "export", "check"}


@pytest.mark.parametrize(("name", "argv", "env", "pattern"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_changes_nothing(
    corpus: dict[str, Path], name: str, argv: list[str], env: dict[str, str], pattern: str
) -> None:
    values = {key: str(path) for key, path in corpus.items()}
    argv = [item.format(**values) for item in argv]
    env = {key: value.format(**values) for key, value in env.items()}
    before = _fingerprint(corpus["tmp"])
    result = CliRunner().invoke(app, argv, env={"NORMDROP_STORE": "", **env}, catch_exceptions=True)
    output = result.stdout + result.stderr
    assert result.exit_code != 0, f"{name}: exit 0\n{output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{name}: uncaught {result.exception!r}"
    )
    assert "Traceback" not in output
    assert re.search(pattern, _message(result.stderr)), f"{name}: {pattern!r} not in\n{result.stderr}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if errors:  # our own error: exactly one line on stderr (a usage error is click's box)
        assert len(errors) == 1 and len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1, result.stderr
    after = _fingerprint(corpus["tmp"])
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    # A bad input may at most leave the output directories it refused untouched; no store file changes, appears
    # or disappears.
    assert not changed, f"{name} changed {changed}"


def _can_mount() -> bool:
    return sys.platform == "linux" and os.geteuid() == 0


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a read-only file system")
def test_a_read_only_store_is_refused_before_training_and_still_reads(corpus: dict[str, Path], tmp_path: Path) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mount / "s.sqlite").write_bytes(corpus["good"].read_bytes())
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        store = str(mount / "s.sqlite")
        result = CliRunner().invoke(app, ["sweep", str(corpus["study_ok"]), "--store", store, "-q"])
        assert result.exit_code == 2 and "read-only" in result.stderr, result.stderr
        result = CliRunner().invoke(app, [*T, "--store", store])
        assert result.exit_code == 2 and "read-only" in result.stderr, result.stderr
        result = CliRunner().invoke(app, ["runs", "--store", store])  # reading needs no write access
        assert result.exit_code == 0 and "3 runs" in result.stdout, result.stdout + result.stderr
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a small file system")
def test_a_full_disk_mid_sweep_is_one_line_naming_the_saved_runs(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        study = tmp_path / "study.toml"
        study.write_text('seeds = 20\n[fixed]\ndataset = "blobs"\nsteps = 40\neval_every = 1\n')
        process = subprocess.run(
            [
                str(Path(sys.executable).parent / "normdrop"),
                "sweep",
                str(study),
                "--store",
                str(mount / "s.sqlite"),
                "-q",
                "--workers",
                "1",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        assert process.returncode == 2, process.stderr
        assert "Traceback" not in process.stderr
        lines = [line for line in process.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "the disk is full" in lines[0], process.stderr
        saved = int(re.search(r"(\d+) runs of this sweep were saved", lines[0]).group(1))
        with Store(mount / "s.sqlite", readonly=True) as store:
            assert len(store.completed_ids()) == saved
    finally:
        subprocess.run(["umount", str(mount)], check=False)
