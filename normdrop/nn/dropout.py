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

import typing

import torch
from torch import Tensor

from normdrop.nn import functional as F
from normdrop.nn.interop import fx_leaf_call, scripted_dropout


class _WithGenerator:
    """Adds an optional ``generator`` (a torch.Generator) that the layer draws its mask seeds from, and what the
    layers need for FX and TorchScript (``normdrop.nn.interop``): each layer's forward records a leaf node when
    symbolically traced, and has a scriptable form (``_script_mask_dims`` says which dims its mask covers)."""

    generator: torch.Generator | None
    __jit_ignored_attributes__: typing.ClassVar[list[str]] = ["generator"]

    def __init__(self, p: float = 0.5, inplace: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__(p, inplace)
        self.generator = generator

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """TorchScript has no torch.Generator attributes: a layer with its own generator cannot be scripted (its
        masks would silently come from the default generator instead)."""
        if self.generator is not None:
            raise TypeError(
                f"torch.jit.script cannot carry the generator of {type(self).__name__}: set generator=None (masks "
                "then come from torch's default generator) or use torch.compile / torch.jit.trace"
            )
        return self

    def _script_mask_dims(self, input: Tensor) -> int:
        """How many leading dims of ``input`` the mask covers (all: element-wise dropout)."""
        return input.dim()

    def _script_alpha(self) -> bool:
        """Whether the layer is alpha dropout (a class constant, as a method: TorchScript reads no class data)."""
        return False

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            alpha = self._script_alpha()
            # As in eager mode and in torch.nn, the alpha dropouts ignore ``inplace``: never write into the input.
            inplace = self.inplace and not alpha
            return scripted_dropout(input, self.p, self.training, inplace, self._script_mask_dims(input), alpha)
        if isinstance(input, torch.fx.Proxy):  # symbolic tracing: a leaf module, as torch.nn's layers are
            return fx_leaf_call(self, input)
        return self._eager_forward(input)


class Dropout(_WithGenerator, torch.nn.Dropout):
    r"""Element-wise dropout; drop-in for torch.nn.Dropout.

    Training: y = x * m / (1 - p), m_i ~ Bernoulli(1 - p) independently, so E[y] = x.
    Inference: y = x.
    """

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, self.training, self.inplace, generator=self.generator)


class Dropout1d(_WithGenerator, torch.nn.Dropout1d):
    r"""Channel dropout on (N, C, L) or (C, L); drop-in for torch.nn.Dropout1d.

    Training: y[n, c, :] = x[n, c, :] * m[n, c] / (1 - p), m ~ Bernoulli(1 - p). Inference: y = x.
    """

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        return F.dropout1d(input, self.p, self.training, self.inplace, generator=self.generator)

    def _script_mask_dims(self, input: Tensor) -> int:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError("dropout1d expects a 2D (C, L) or 3D (N, C, L) input")
        return 2 if input.dim() == 3 else 1


class Dropout2d(_WithGenerator, torch.nn.Dropout2d):
    r"""Channel dropout on (N, C, H, W); drop-in for torch.nn.Dropout2d.

    Training: y[n, c] = x[n, c] * m[n, c] / (1 - p), m ~ Bernoulli(1 - p). Inference: y = x.
    """

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        return F.dropout2d(input, self.p, self.training, self.inplace, generator=self.generator)

    def _script_mask_dims(self, input: Tensor) -> int:
        return 2


class Dropout3d(_WithGenerator, torch.nn.Dropout3d):
    r"""Channel dropout on (N, C, D, H, W) or (C, D, H, W); drop-in for torch.nn.Dropout3d.

    Training: y[n, c] = x[n, c] * m[n, c] / (1 - p), m ~ Bernoulli(1 - p). Inference: y = x.
    """

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        return F.dropout3d(input, self.p, self.training, self.inplace, generator=self.generator)

    def _script_mask_dims(self, input: Tensor) -> int:
        return 2 if input.dim() == 5 else 1


class AlphaDropout(_WithGenerator, torch.nn.AlphaDropout):
    r"""Alpha dropout for SELU networks; drop-in for torch.nn.AlphaDropout.

    Training: y = a (x m + s' (1 - m)) + b with s' = -1.7581 (SELU's saturation), a = ((1-p)(1 + p s'^2))^(-1/2),
    b = -a s' p: zero-mean unit-variance inputs keep mean 0 and variance 1. Inference: y = x.

    As torch.nn.AlphaDropout's, the forward never writes into its input: torch's ignores ``inplace`` (kept in the
    signature and the repr), and a drop-in must not change a tensor torch's layer leaves alone. In-place alpha
    dropout is ``normdrop.nn.functional.alpha_dropout(x, p, training, inplace=True)``.
    """

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        return F.alpha_dropout(input, self.p, self.training, False, generator=self.generator)

    def _script_alpha(self) -> bool:
        return True


class FeatureAlphaDropout(_WithGenerator, torch.nn.FeatureAlphaDropout):
    r"""Alpha dropout of whole channels of (N, C, \*); drop-in for torch.nn.FeatureAlphaDropout.

    Training: as AlphaDropout with one mask value m[n, c] per channel. Inference: y = x. Never in place, as
    torch.nn.FeatureAlphaDropout (which ignores ``inplace``; see AlphaDropout).
    """

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        return F.feature_alpha_dropout(input, self.p, self.training, False, generator=self.generator)

    def _script_alpha(self) -> bool:
        return True

    def _script_mask_dims(self, input: Tensor) -> int:
        return 2
