"""Dropout layers, drop-in replacements for torch.nn's.

- Dropout: Srivastava et al. 2014, "Dropout: A Simple Way to Prevent Neural Networks from Overfitting".
- Dropout1d/2d/3d (channel dropout): Tompson et al. 2015, "Efficient Object Localization Using Convolutional
  Networks".
- AlphaDropout / FeatureAlphaDropout: Klambauer et al. 2017, "Self-Normalizing Neural Networks".

They subclass torch's classes (and so ``_DropoutNd``): constructor (with its check that 0 <= p <= 1), repr and
``isinstance`` behave as torch's. The forward is normdrop's: masks come from a counter-based generator and are
regenerated in backward rather than stored. Each layer also accepts ``generator=`` for its own random stream.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normdrop.nn import functional as F


class _WithGenerator:
    """Adds an optional ``generator`` (a torch.Generator) that the layer draws its mask seeds from."""

    generator: torch.Generator | None

    def __init__(self, p: float = 0.5, inplace: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__(p, inplace)
        self.generator = generator


class Dropout(_WithGenerator, torch.nn.Dropout):
    r"""Element-wise dropout; drop-in for torch.nn.Dropout.

    Training: y = x * m / (1 - p), m_i ~ Bernoulli(1 - p) independently, so E[y] = x.
    Inference: y = x.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, self.training, self.inplace, generator=self.generator)


class Dropout1d(_WithGenerator, torch.nn.Dropout1d):
    r"""Channel dropout on (N, C, L) or (C, L); drop-in for torch.nn.Dropout1d.

    Training: y[n, c, :] = x[n, c, :] * m[n, c] / (1 - p), m ~ Bernoulli(1 - p). Inference: y = x.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout1d(input, self.p, self.training, self.inplace, generator=self.generator)


class Dropout2d(_WithGenerator, torch.nn.Dropout2d):
    r"""Channel dropout on (N, C, H, W); drop-in for torch.nn.Dropout2d.

    Training: y[n, c] = x[n, c] * m[n, c] / (1 - p), m ~ Bernoulli(1 - p). Inference: y = x.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout2d(input, self.p, self.training, self.inplace, generator=self.generator)


class Dropout3d(_WithGenerator, torch.nn.Dropout3d):
    r"""Channel dropout on (N, C, D, H, W) or (C, D, H, W); drop-in for torch.nn.Dropout3d.

    Training: y[n, c] = x[n, c] * m[n, c] / (1 - p), m ~ Bernoulli(1 - p). Inference: y = x.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout3d(input, self.p, self.training, self.inplace, generator=self.generator)


class AlphaDropout(_WithGenerator, torch.nn.AlphaDropout):
    r"""Alpha dropout for SELU networks; drop-in for torch.nn.AlphaDropout.

    Training: y = a (x m + s' (1 - m)) + b with s' = -1.7581 (SELU's saturation), a = ((1-p)(1 + p s'^2))^(-1/2),
    b = -a s' p: zero-mean unit-variance inputs keep mean 0 and variance 1. Inference: y = x.

    As torch.nn.AlphaDropout's, the forward never writes into its input: torch's ignores ``inplace`` (kept in the
    signature and the repr), and a drop-in must not change a tensor torch's layer leaves alone. In-place alpha
    dropout is ``normdrop.nn.functional.alpha_dropout(x, p, training, inplace=True)``.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.alpha_dropout(input, self.p, self.training, False, generator=self.generator)


class FeatureAlphaDropout(_WithGenerator, torch.nn.FeatureAlphaDropout):
    r"""Alpha dropout of whole channels of (N, C, \*); drop-in for torch.nn.FeatureAlphaDropout.

    Training: as AlphaDropout with one mask value m[n, c] per channel. Inference: y = x. Never in place, as
    torch.nn.FeatureAlphaDropout (which ignores ``inplace``; see AlphaDropout).
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.feature_alpha_dropout(input, self.p, self.training, False, generator=self.generator)
