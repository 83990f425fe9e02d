"""The loss landscape along the gradient (Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization
Help Optimization?", section 3.1 and figure 4).

At parameters w with gradient g = grad L(w) on a batch, and step sizes eta over a range, the paper measures

    loss variation              range over eta of L(w - eta g)
    gradient predictiveness     ||grad L(w) - grad L(w - eta g)||
    effective beta-smoothness   max over eta of ||grad L(w) - grad L(w - eta g)|| / ||eta g||

and finds all three smaller (smoother, more predictive) with BN. For a quadratic L(w) = w'Aw/2 - b'w the gradient
change is exactly eta A g, so the predictiveness is eta ||A g|| and the beta-smoothness ||A g|| / ||g||.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from normdrop.probe_catalog import DEFAULT_EVERY, When
from normdrop.probes.base import (
    BNMode,
    Probe,
    Record,
    bn_mode_label,
    cosine,
    gradients,
    loss_function,
    measurement_mode,
    trainable,
)
from normdrop.tensors import global_norm
from normdrop.train import HookContext

LR_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
"""Default step sizes, as multiples of the run's learning rate: a factor 4 either side, as in the paper's range."""


def loss_and_gradient(
    loss_at: Callable[[dict[str, Tensor]], Tensor], at: dict[str, Tensor]
) -> tuple[float, list[Tensor]]:
    """L(at) and grad L(at) (a list in ``at``'s order; zeros where the loss does not depend on a parameter)."""
    leaves = {name: value.detach().requires_grad_(True) for name, value in at.items()}
    loss = loss_at(leaves)
    return float(loss.detach()), gradients(loss, list(leaves.values()))


class LandscapeProbe(Probe):
    """Loss and gradient along the gradient direction at step sizes around the learning rate, on the probe batch.

    Step sizes are ``etas`` if given, else ``lr_multipliers`` times the run's learning rate at this step. The step is
    along the raw gradient whatever the optimizer (the paper's definition). BN is in ``bn_mode`` and dropout, when
    ``dropout`` is on, uses the same masks at every point.

    Records: one per step size, with ``eta``, ``lr_multiplier`` (None when ``etas`` were given), ``loss`` =
    L(w - eta g), ``loss_change`` = L(w - eta g) - L(w), ``grad_change`` = ||grad L(w) - grad L(w - eta g)||,
    ``beta`` = grad_change / ||eta g||, ``grad_cosine`` = cos(grad L(w), grad L(w - eta g)); and one summary with
    ``eta=None``: ``loss`` = L(w), ``grad_norm`` = ||g||, ``loss_range`` (max - min loss over the step sizes),
    ``grad_change_max``, ``beta_smoothness`` (max beta). Every record has ``bn_mode`` and ``dropout``.
    """

    name = "landscape"
    needs = frozenset({"model", "loss_fn", "probe_batch"})

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        when: When | None = None,
        *,
        lr_multipliers: Sequence[float] = LR_MULTIPLIERS,
        etas: Sequence[float] | None = None,
        bn_mode: BNMode = "batch",
        dropout: bool = True,
    ) -> None:
        super().__init__(every, when)
        steps = etas if etas is not None else lr_multipliers
        if not steps or min(steps) <= 0:
            raise ValueError(f"step sizes must be a non-empty list of positive numbers, got {list(steps)}")
        self.lr_multipliers = tuple(lr_multipliers)
        self.etas = None if etas is None else tuple(etas)
        self.bn_mode: BNMode = bn_mode
        self.dropout = dropout

    def measure(self, ctx: HookContext) -> list[Record]:
        model = ctx.model
        common = {"bn_mode": bn_mode_label(model, self.bn_mode), "dropout": self.dropout}
        with measurement_mode(model, self.bn_mode, self.dropout):
            loss_at = loss_function(model, ctx.loss_fn, ctx.probe_batch)
            w = trainable(model)
            loss, g = loss_and_gradient(loss_at, w)
            grad_norm = float(global_norm(g))
            if self.etas is not None:
                steps = [(eta, None) for eta in self.etas]
            else:
                steps = [(ctx.lr * multiplier, multiplier) for multiplier in self.lr_multipliers]
            records: list[Record] = []
            for eta, multiplier in steps:
                moved = {name: value - eta * grad for (name, value), grad in zip(w.items(), g, strict=True)}
                moved_loss, moved_g = loss_and_gradient(loss_at, moved)
                change = float(global_norm([a - b for a, b in zip(g, moved_g, strict=True)]))
                records.append(
                    {
                        "eta": eta,
                        "lr_multiplier": multiplier,
                        "loss": moved_loss,
                        "loss_change": moved_loss - loss,
                        "grad_change": change,
                        "beta": change / (eta * grad_norm) if grad_norm > 0 else None,
                        "grad_cosine": cosine(g, moved_g),
                        **common,
                    }
                )
        losses = [r["loss"] for r in records]
        betas = [r["beta"] for r in records if r["beta"] is not None]
        summary = {
            "eta": None,
            "loss": loss,
            "grad_norm": grad_norm,
            "loss_range": max(losses) - min(losses),
            "grad_change_max": max(r["grad_change"] for r in records),
            "beta_smoothness": max(betas) if betas else None,
            **common,
        }
        return [*records, summary]
