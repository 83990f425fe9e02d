"""Start-up of the command line against ``import torch``: wall time of ``normdrop --help``, of every
``normdrop CMD --help`` and of ``normdrop sweep FILE`` with every run of FILE already in the store (16 runs over
four norm kinds, saved without training), over ``python -c "import torch"``; the commands interleaved, medians (and
extremes) over rounds. Goals: the helps at most 0.25x, the stored sweep at most 2 s.

    python -m benchmarks.bench_startup [ROUNDS] [ONLY]

ONLY keeps the commands whose label contains it (``sweep``: the stored sweep alone), beside ``import torch``.

Run from the repository root with the venv's Python (it starts ``.venv/bin/normdrop``).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from normdrop.cli import COMMANDS

SWEEP_FILE = """\
seeds = 2

[fixed]
dataset = "blobs"
steps = 100

[grid]
norm = ["none", "batch", "renorm", "frozen"]
dropout = [0.0, 0.2]
"""


def stored_sweep(directory: Path) -> tuple[Path, Path]:
    """A sweep file and a store that holds all its runs (saved as finished, without training)."""
    from normdrop.spec import RunResult
    from normdrop.store import RunProvenance, Store
    from normdrop.sweep import load_sweep_file

    sweep_file, store_path = directory / "sweep.toml", directory / "runs.db"
    sweep_file.write_text(SWEEP_FILE)
    with Store(store_path) as store:
        for spec in load_sweep_file(sweep_file):
            store.save(RunResult(spec.run_id, spec, "finished"), RunProvenance.collect(0.0, 0.0))
    return sweep_file, store_path


def main(rounds: int = 5, only: str = "") -> None:
    bin_dir = Path(sys.executable).parent
    normdrop = str(bin_dir / "normdrop")
    sweep_file, store_path = stored_sweep(Path(tempfile.mkdtemp(prefix="bench-startup-")))
    commands = {"import torch": [sys.executable, "-c", "import torch"], "--help": [normdrop, "--help"]}
    commands["sweep, all stored"] = [normdrop, "sweep", str(sweep_file), "--store", str(store_path)]
    commands.update({f"{name} --help": [normdrop, name, "--help"] for name in COMMANDS})
    commands = {label: argv for label, argv in commands.items() if label == "import torch" or only in label}
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} at the start")
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(rounds):
        for label, argv in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times[label].append(time.perf_counter() - start)
    reference = statistics.median(times["import torch"])
    for label, values in times.items():
        median = statistics.median(values)
        print(
            f"{label:24s} median {median:.3f} s (min {min(values):.3f}, max {max(values):.3f})   "
            f"{median / reference:.3f}x import torch"
        )
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} at the end")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5, sys.argv[2] if len(sys.argv) > 2 else "")
