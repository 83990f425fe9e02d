"""Start-up of the command line against ``import torch``: wall time of ``normdrop --help`` and of every
``normdrop CMD --help`` over ``python -c "import torch"``, the commands interleaved, medians over rounds.

    python -m benchmarks.bench_startup [ROUNDS]

Run from the repository root with the venv's Python (it starts ``.venv/bin/normdrop``).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from normdrop.cli import COMMANDS


def main(rounds: int = 5) -> None:
    bin_dir = Path(sys.executable).parent
    normdrop = str(bin_dir / "normdrop")
    commands = {"import torch": [sys.executable, "-c", "import torch"], "--help": [normdrop, "--help"]}
    commands.update({f"{name} --help": [normdrop, name, "--help"] for name in COMMANDS})
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(rounds):
        for label, argv in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times[label].append(time.perf_counter() - start)
    reference = statistics.median(times["import torch"])
    for label, values in times.items():
        median = statistics.median(values)
        print(f"{label:24s} median {median:.3f} s   {median / reference:.3f}x import torch")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
