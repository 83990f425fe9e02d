"""``normdrop.ablate``: the claims, tested on the user's own model and data.

    plan: each claim's cells (arm, learning rate), every arm tried by surgery on ``model_fn()`` (a knob that cannot
          apply makes the claim "not applicable" with the reason)
    runs: one :class:`~normdrop.spec.UserRunSpec` per cell and seed; the store's finished runs are reused, the
          others trained by :func:`normdrop.train.fit` and saved
    verdicts: each claim's analysis (:mod:`normdrop.ablation.claims`) with the study's statistics
    report: ``summary.json`` and ``report.html`` in ``out``

Runs are in-process and serial, one torch thread each (so results are identical across machines).
"""

from __future__ import annotations

import html
import json
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normdrop.ablation.arms import MEASURE_EXAMPLES, FinalMeasurements, NotApplicable, apply_arm, trace
from normdrop.ablation.claims import CLAIMS, NOT_SUPPORTED, AblationClaim, Context, probes_for
from normdrop.ablation.inputs import (
    UserData,
    UserInputError,
    build_model,
    model_fingerprint,
    prepare_data,
    state_fingerprint,
)
from normdrop.claims import get as get_claim
from normdrop.claims.results import Analysis, Measurement
from normdrop.spec import RunResult, UserRunSpec
from normdrop.store import DEFAULT_STORE_FILENAME, Store

DEFAULT_SEEDS = 3
DEFAULT_STEPS = 300
Trainer = Callable[[UserRunSpec, nn.Module, UserData], RunResult]
"""Trains one run: (spec, model after surgery, data) -> result. The default is :func:`train_run`."""


def train_run(spec: UserRunSpec, model: nn.Module, data: UserData) -> RunResult:
    """:func:`normdrop.train.fit` with the end-of-training measurements the spec names."""
    from normdrop.train import fit

    hooks = [FinalMeasurements(data.training_inputs(MEASURE_EXAMPLES), data.test)] if spec.probes else []
    return fit(spec, model, data.train, data.test, hooks=hooks)


@dataclass
class ClaimOutcome:
    """One claim's result: a verdict with its analysis, or not applicable / not supported with the reason."""

    id: str
    title: str
    statement: str
    status: str  # "tested", "not applicable", "not supported"
    reason: str = ""
    knobs: str = ""
    cells: dict[str, tuple[str, float]] = field(default_factory=dict)
    analysis: Analysis | None = None

    @property
    def verdict(self) -> str:
        return self.analysis.primary.verdict if self.analysis is not None else self.status

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "title": self.title,
            "statement": self.statement,
            "status": self.status,
            "verdict": self.verdict,
            "reason": self.reason,
            "knobs": self.knobs,
            "cells": {label: {"arm": arm, "lr": lr} for label, (arm, lr) in self.cells.items()},
        }
        if self.analysis is not None:
            out["primary"] = _measurement(self.analysis.primary)
            out["secondary"] = [_measurement(m) for m in self.analysis.secondary]
            out["findings"] = list(self.analysis.findings)
        return out


def _measurement(m: Measurement) -> dict[str, Any]:
    e = m.estimate
    return {
        "name": m.name,
        "metric": m.metric,
        "direction": m.direction,
        "verdict": m.verdict,
        "reason": m.decision.reason,
        "effect": None if e is None else e.value,
        "ci": None if e is None else [e.ci_low, e.ci_high],
        "n": None if e is None else e.n,
        "per_seed": {str(k): v for k, v in m.per_seed.items()},
        "unit": m.unit,
    }


@dataclass
class AblationOutcome:
    """Everything the report shows."""

    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    claims: list[ClaimOutcome]
    arms: dict[str, dict[str, Any]]
    runs: dict[str, int]
    wall_seconds: float
    store_path: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "settings": self.settings,
            "arms": self.arms,
            "runs": self.runs,
            "wall_seconds": self.wall_seconds,
            "store": self.store_path,
            "claims": [claim.to_dict() for claim in self.claims],
        }

    def verdicts(self) -> dict[str, str]:
        return {claim.id: claim.verdict for claim in self.claims}


def _module_summary(model: nn.Module) -> dict[str, Any]:
    layout_counts: dict[str, int] = {}
    for module in model.modules():
        layout_counts[type(module).__name__] = layout_counts.get(type(module).__name__, 0) + 1
    return {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "modules": layout_counts,
        "tree": repr(model),
    }


def ablate(
    model_fn: Callable[[], nn.Module],
    data: Any,
    *,
    claims: Sequence[str] | None = None,
    seeds: int = DEFAULT_SEEDS,
    steps: int = DEFAULT_STEPS,
    optimizer: str = "adam",
    lr: float = 1e-3,
    batch_size: int = 64,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    eval_every: int | None = None,
    out: str | Path | None = None,
    store: str | Path = DEFAULT_STORE_FILENAME,
    model_name: str | None = None,
    progress: bool = True,
    trainer: Trainer | None = None,
) -> AblationOutcome:
    """Test the claims on the user's model and data (see the module docstring).

    Args:
        model_fn: returns a fresh ``nn.Module`` (called once per seed and arm, with torch's generator seeded).
        data: ``(X_train, y_train, X_test, y_test)`` arrays / tensors, a (train, test) pair of Datasets or of
            DataLoaders, or a mapping with those keys (a loaded ``.npz``). Classification with cross-entropy:
            the model maps a batch of inputs to logits ``(batch, classes)``.
        claims: claim ids (default: all that ablate supports, :data:`normdrop.ablation.claims.CLAIMS`).
        seeds: seeds per cell; steps, optimizer, lr, batch_size, momentum, weight_decay, eval_every: training
            (batch_size is ignored with DataLoaders, which batch themselves; eval_every defaults to steps // 5).
        out: directory for ``summary.json`` and ``report.html`` (None: no files).
        store: the run store (SQLite), shared with ``normdrop study``.
        trainer: trains one run (default :func:`train_run`); tests pass a fake one with a known effect.
    """
    started = time.perf_counter()
    if seeds < 2:
        raise UserInputError(f"seeds must be at least 2 (a confidence interval needs two values), got {seeds}")
    chosen = list(claims) if claims is not None else list(CLAIMS)
    unknown = [c for c in chosen if c not in CLAIMS and c not in NOT_SUPPORTED]
    if unknown:
        raise UserInputError(f"unknown claim(s) {unknown}; ablate tests {', '.join(CLAIMS)}")
    data = prepare_data(data)
    name = model_name or getattr(model_fn, "__qualname__", repr(model_fn))
    given = build_model(model_fn, 0)
    structure = model_fingerprint(given)
    sample = data.sample
    try:
        with torch.no_grad():
            logits = given.eval()(sample)
    except Exception as error:
        raise UserInputError(f"the model fails on a batch of inputs {tuple(sample.shape)}: {error}") from None
    if logits.ndim != 2 or logits.shape[1] < data.num_classes:
        raise UserInputError(
            f"the model returns {tuple(logits.shape)} for {len(sample)} inputs; expected logits "
            f"({len(sample)}, >= {data.num_classes} classes)"
        )
    layout = trace(given, sample)
    batch = None if data.loaders else batch_size
    if batch is not None and batch > data.train_size:
        raise UserInputError(f"batch_size={batch} exceeds the {data.train_size} training examples")
    batch_sizes = _batch_sizes(data, batch)
    ctx = Context(layout, lr, batch)
    settings = {"batch_sizes": batch_sizes}
    training = {
        "optimizer": optimizer,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "batch_size": batch,
        "steps": steps,
        "eval_every": eval_every or max(1, steps // 5),
    }

    # Plan: which arms apply (tried on the seed-0 model), then each claim's cells.
    arm_status: dict[str, dict[str, Any]] = {}

    def try_arm(arm: str) -> str | None:
        if arm not in arm_status:
            try:
                model = apply_arm(build_model(model_fn, 0), arm, sample, settings)
                arm_status[arm] = {"applicable": True, "layers": trace(model, sample).describe()}
                arm_status[arm]["parameters"] = sum(p.numel() for p in model.parameters())
            except NotApplicable as reason:
                arm_status[arm] = {"applicable": False, "reason": str(reason)}
        return arm_status[arm].get("reason")

    outcomes: list[ClaimOutcome] = []
    plans: dict[str, AblationClaim] = {}
    for claim_id in chosen:
        title, statement = _claim_text(claim_id)
        if claim_id in NOT_SUPPORTED:
            outcomes.append(ClaimOutcome(claim_id, title, statement, "not supported", NOT_SUPPORTED[claim_id]))
            continue
        claim = CLAIMS[claim_id]
        cells = claim.cells(ctx)
        reasons = {arm: reason for arm, _ in cells.values() if (reason := try_arm(arm)) is not None}
        outcome = ClaimOutcome(claim_id, title, statement, "tested", knobs=claim.knobs, cells=cells)
        if reasons:
            outcome.status = "not applicable"
            outcome.reason = "; ".join(f"arm {arm}: {reason}" for arm, reason in reasons.items())
        else:
            plans[claim_id] = claim
        outcomes.append(outcome)

    # Runs: each (arm, lr, seed) once, reused from the store when there.
    wanted = {(arm, lr_) for o in outcomes if o.id in plans for arm, lr_ in o.cells.values()}
    results: dict[tuple[str, float, int], RunResult] = {}
    counts = {"total": 0, "reused": 0, "trained": 0, "failed": 0}
    train = trainer or train_run
    init_prints = {seed: state_fingerprint(build_model(model_fn, seed)) for seed in range(seeds)}
    with Store(store) as db:
        done = db.completed_ids()
        for arm, cell_lr in sorted(wanted):
            for seed in range(seeds):
                spec = UserRunSpec(
                    model=name,
                    model_fingerprint=structure,
                    init_fingerprint=init_prints[seed],
                    data_fingerprint=data.fingerprint,
                    arm=arm,
                    probes=probes_for(arm, ctx),
                    seed=seed,
                    **{**training, "lr": cell_lr},
                )
                counts["total"] += 1
                if spec.run_id in done:
                    results[(arm, cell_lr, seed)] = db.result(spec.run_id)
                    counts["reused"] += 1
                    continue
                if progress:
                    print(f"ablate: arm {arm}, lr {cell_lr:g}, seed {seed}", flush=True)
                try:
                    model = apply_arm(build_model(model_fn, seed), arm, sample, settings)
                    result = train(spec, model, data)
                except Exception as error:
                    detail = "".join(traceback.format_exception_only(error)).strip()
                    result = RunResult(spec.run_id, spec, "failed", error=detail)
                db.save(result)
                counts["trained" if result.status != "failed" else "failed"] += 1
                results[(arm, cell_lr, seed)] = result

    for outcome in outcomes:
        if outcome.id not in plans:
            continue
        cells = {
            label: {seed: results.get((arm, cell_lr, seed)) for seed in range(seeds)}
            for label, (arm, cell_lr) in outcome.cells.items()
        }
        try:
            outcome.analysis = plans[outcome.id].analyze(cells, ctx)
        except Exception as error:
            outcome.status = "analysis failed"
            outcome.reason = "".join(traceback.format_exception_only(error)).strip()

    result = AblationOutcome(
        model={"name": name, "fingerprint": structure, "layers": layout.describe(), **_module_summary(given)},
        data=data.describe(),
        settings={**training, "seeds": seeds},
        claims=outcomes,
        arms=arm_status,
        runs=counts,
        wall_seconds=time.perf_counter() - started,
        store_path=str(store),
    )
    if out is not None:
        write_report(result, Path(out))
    return result


def _batch_sizes(data: UserData, batch: int | None) -> tuple[int, ...]:
    """The sizes of the training batches (a DataLoader's: of one pass)."""
    if batch is not None:
        return (batch,)
    return tuple(sorted({len(b[1]) for b in data.train}))


def _claim_text(claim_id: str) -> tuple[str, str]:
    try:
        claim = get_claim(claim_id)
    except KeyError:
        return claim_id, ""
    return claim.title, claim.statement


# ---- report ---------------------------------------------------------------------------------------------------


def _fmt(m: dict[str, Any]) -> str:
    if m["effect"] is None:
        return "-"
    low, high = m["ci"]
    return f"{m['effect']:+.3g} {m['unit']} [{low:+.3g}, {high:+.3g}], n={m['n']}"


def write_report(outcome: AblationOutcome, out: Path) -> tuple[Path, Path]:
    """``summary.json`` and a self-contained ``report.html`` (model, data, arms, verdict table) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = outcome.to_dict()
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(summary, indent=2, default=str))
    e = html.escape
    rows = []
    for claim in summary["claims"]:
        effect = _fmt(claim["primary"]) if "primary" in claim else "-"
        why = claim["reason"] or (claim["primary"]["reason"] if "primary" in claim else "")
        rows.append(
            f"<tr><td><b>{e(claim['id'])}</b><br><small>{e(claim['statement'])}</small></td>"
            f"<td class='v'>{e(claim['verdict'])}</td><td>{e(effect)}</td><td><small>{e(why)}</small></td></tr>"
        )
    details = []
    for claim in summary["claims"]:
        if "primary" not in claim:
            continue
        items = "".join(
            f"<li>{e(m['name'])}: <b>{e(m['verdict'])}</b>, {e(_fmt(m))}<br><small>{e(m['metric'])}</small></li>"
            for m in [claim["primary"], *claim["secondary"]]
        )
        cells = ", ".join(f"{label}: {c['arm']} @ lr {c['lr']:g}" for label, c in claim["cells"].items())
        findings = "".join(f"<li>{e(f)}</li>" for f in claim["findings"])
        details.append(
            f"<h3>{e(claim['id'])}: {e(claim['title'])}</h3><p>Knobs: {e(claim['knobs'])}.<br>"
            f"<small>Cells: {e(cells)}</small></p><ul>{items}{findings}</ul>"
        )
    arms = "".join(
        f"<li><b>{e(arm)}</b>: "
        + (
            f"{info['parameters']} parameters; <small>{e(' | '.join(info['layers']))}</small>"
            if info["applicable"]
            else f"not applicable: {e(info['reason'])}"
        )
        + "</li>"
        for arm, info in summary["arms"].items()
    )
    model, data = summary["model"], summary["data"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>normdrop ablate: {e(model["name"])}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.4em;vertical-align:top}}.v{{font-weight:bold}}pre{{background:#f6f6f6;
padding:.5em;overflow:auto;font-size:.8em}}</style></head><body>
<h1>normdrop ablate: the claims on {e(model["name"])}</h1>
<p>Model: {e(model["class"])}, {model["parameters"]} parameters ({model["trainable_parameters"]} trainable).
Data: inputs {e(str(tuple(data["input_shape"])))}, {data["num_classes"]} classes, {data["train_size"]} training and
{data["test_size"]} test examples ({e(data["form"])}). Training: {e(json.dumps(summary["settings"]))}.
Runs: {e(json.dumps(summary["runs"]))} in {summary["wall_seconds"]:.0f} s; store {e(summary["store"])}.</p>
<table><tr><th>claim</th><th>verdict</th><th>primary effect, 95% CI</th><th>reason / rule</th></tr>
{"".join(rows)}</table>
<h2>Where BN and dropout sit, per arm</h2><p>Layers in call order:
<small>{e(" | ".join(model["layers"]))}</small></p><ul>{arms}</ul>
<h2>Claims</h2>{"".join(details)}
<h2>The model</h2><pre>{e(model["tree"])}</pre></body></html>"""
    html_path = out / "report.html"
    html_path.write_text(page)
    return json_path, html_path
