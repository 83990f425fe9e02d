"""numba's compiled-kernel cache lives under the user cache dir (overridable), never in the installed package: a
read-only install works and writes nothing into itself (issue 12, item 14)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import normdrop

SCRIPT = """
import warnings, torch
warnings.simplefilter("error")  # numba's "cannot cache" NumbaWarning would fail the run
import normdrop.nn as nd
from normdrop.nn.kernels import numba_cpu
x = torch.randn(8, 3, requires_grad=True)
nd.BatchNorm1d(3)(x).sum().backward()
print(numba_cpu.numba_cache_dir())
"""


def _read_only_copy(tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the normdrop package on a read-only file system (root: a tmpfs remounted ro), else read-only
    permissions; returns the directory to put on sys.path and the command that undoes the mount."""
    root = tmp_path / "site"
    root.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)], check=False).returncode:
            pytest.skip("cannot mount a tmpfs")
        shutil.copytree(Path(normdrop.__file__).parent, root / "normdrop", ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        return root, ["umount", str(root)]
    shutil.copytree(Path(normdrop.__file__).parent, root / "normdrop", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [root, *root.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return root, []


@pytest.mark.slow  # compiles the kernels in a fresh process (~30 s on 2 busy cores)
def test_kernels_cache_under_the_user_cache_dir_with_a_read_only_package(tmp_path: Path) -> None:
    site, undo = _read_only_copy(tmp_path)
    cache = tmp_path / "numba-cache"
    try:
        env = {
            **{k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"},
            "PYTHONPATH": str(site),
            "PYTHONDONTWRITEBYTECODE": "1",
            "NORMDROP_NUMBA_CACHE_DIR": str(cache),
        }
        process = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
            cwd=tmp_path,
        )
        assert process.returncode == 0, process.stderr
        assert process.stdout.strip() == str(cache)
        assert any(cache.rglob("*.nbi")), "no numba index file in the cache dir"
        assert not list((site / "normdrop").rglob("*.nbi")), "numba wrote into the package"
        imported = subprocess.run(
            [sys.executable, "-c", "import normdrop; print(normdrop.__file__)"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
        ).stdout
        assert imported.startswith(str(site)), f"the read-only copy was not the one imported: {imported}"
    finally:
        if undo:
            subprocess.run(undo, check=False)
