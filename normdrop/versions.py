"""Versions of Python and of the packages a run's numbers depend on, as recorded with runs and studies."""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Iterable

RUN_PACKAGES: tuple[str, ...] = ("normdrop", "torch", "numpy")
"""What a stored run's provenance records."""

STUDY_PACKAGES: tuple[str, ...] = (*RUN_PACKAGES, "scipy", "matplotlib")
"""What a study records: the run packages, and those of the analyses and figures."""


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """``{"python": version, package: installed version or None, ...}``."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found
