"""The one place that turns a spec into a run with its instruments: :func:`run_spec` (and :func:`run_fleet_specs`,
the same for the specs of one fleet trained together).

The trainer (:func:`normdrop.train.run`) takes hooks and knows no probe registry; the probes
(:mod:`normdrop.probes`) know the trainer's hook context. :func:`run_spec` joins the two: it builds the probes the
spec names and trains. Every executor (``normdrop train``, sweeps, the study) runs specs through it, so one run id
always measures and keeps the same things (``spec.keep`` says what the store keeps besides metrics and records).
"""

from __future__ import annotations

from collections.abc import Sequence

from normdrop.probes import make_probes
from normdrop.spec import RunResult, RunSpec
from normdrop.train import Hook, run


def run_spec(
    spec: RunSpec,
    *,
    hooks: Sequence[Hook] | None = None,
    progress: bool = False,
    data_root: str | None = None,
    num_threads: int | None = 1,
) -> RunResult:
    """Train ``spec`` with the probes it names (after any extra ``hooks``); the other arguments are those of
    :func:`normdrop.train.run`."""
    return run(
        spec,
        hooks=hooks,
        progress=progress,
        data_root=data_root,
        num_threads=num_threads,
        probe_hooks=make_probes(spec),
    )


def run_fleet_specs(
    specs: Sequence[RunSpec],
    *,
    data_root: str | None = None,
    num_threads: int | None = 1,
) -> list[RunResult]:
    """Train the specs of one fleet together (:func:`normdrop.fleet.run_fleet`), each member with the probes its
    spec names, built per member exactly as :func:`run_spec` builds them: member ``k``'s results equal
    ``run_spec(specs[k])``'s (see :mod:`normdrop.fleet` for the contract)."""
    from normdrop.fleet import run_fleet  # its numba kernels compile only for a fleet

    specs = list(specs)
    return run_fleet(
        specs,
        data_root=data_root,
        num_threads=num_threads,
        probe_hooks=[make_probes(spec) for spec in specs],
    )
