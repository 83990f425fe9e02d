"""Dropout variants that torch.nn lacks, built on normdrop's dropout op and its counter-based random bits.

- GaussianDropout: multiplicative N(1, p / (1 - p)) noise; Srivastava et al. 2014, "Dropout: A Simple Way to
  Prevent Neural Networks from Overfitting", section 10 (and Wang & Manning 2013, "Fast dropout training").
- DropConnect: Bernoulli masks on a Linear layer's weights; Wan et al. 2013, "Regularization of Neural Networks
  using DropConnect".
- DropBlock2d: contiguous square regions of feature maps dropped together; Ghiasi, Lin & Le 2018, "DropBlock: A
  regularization method for convolutional networks".
- DropPath (stochastic depth): whole samples of a residual branch dropped; Huang et al. 2016, "Deep Networks with
  Stochastic Depth", Larsson et al. 2017, "FractalNet".
- Uout: uniform multiplicative noise U(1 - beta, 1 + beta); Li, Chen, Hu & Yang 2019, "Understanding the
  Disharmony between Dropout and Batch Normalization by Variance Shift".
- ConcreteDropout: a dropout rate learned through a continuous relaxation of the Bernoulli mask; Gal, Hron &
  Kendall 2017, "Concrete Dropout".

Functional forms come first, the modules are thin wrappers. Noise comes from the same ``(seed, offset)`` counter
hash as normdrop's dropout masks (``normdrop.nn.rng``), so ``torch.manual_seed`` or a layer's ``generator``
reproduces it, and the multiplicative-noise layers regenerate it in backward rather than store it. All are the
identity in eval mode (DropConnect: the plain Linear).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normdrop.nn import functional as F
from normdrop.nn import ops
from normdrop.nn.interop import fx_leaf_layer
from normdrop.nn.kernels import backend_for, backend_for_device, fastpath
from normdrop.nn.rng import draw_rng_state

__all__ = [
    "DROPOUT_LAYER_TYPES",
    "ConcreteDropout",
    "DropBlock2d",
    "DropConnect",
    "DropPath",
    "GaussianDropout",
    "Uout",
    "concrete_dropout",
    "concrete_dropout_regularization",
    "drop_block2d",
    "drop_path",
    "gaussian_dropout",
    "uout",
]


def _check_probability(p: float, name: str, *, allow_one: bool) -> None:
    upper = "1" if allow_one else "1 (excluded)"
    is_number = isinstance(p, int | float) and not isinstance(p, bool)
    if not (is_number and (0.0 <= p <= 1.0 if allow_one else 0.0 <= p < 1.0)):
        raise ValueError(f"{name} has to be between 0 and {upper}, but got {p!r}")


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, int | float) and not isinstance(beta, bool) and 0.0 <= beta <= 1.0):
        raise ValueError(f"uout beta has to be between 0 and 1, but got {beta!r}")


def _uniform(shape: torch.Size, rng_state: Tensor, stream: int, device: torch.device) -> Tensor:
    """Float64 uniforms in (0, 1) of the given shape from ``rng_state = (seed, offset)``; ``stream`` k uses the
    counters offset + k * numel + i, so several independent fields can be drawn from one pair."""
    seed, offset = (int(v) for v in rng_state.tolist())
    count = math.prod(shape)
    return backend_for_device(device).uniform(seed, offset + stream * count, count, device).view(shape)


class _MultiplicativeNoise(torch.autograd.Function):
    """y = x * eps with eps regenerated from (seed, offset) (``kernels.composite.multiplicative_noise``): backward
    is the same map on the gradient, so nothing the size of x is saved and the op is differentiable any number of
    times."""

    @staticmethod
    def forward(ctx, x, rng_state, kind, scale):
        ctx.save_for_backward(rng_state)
        ctx.params = (kind, scale)
        seed, offset = (int(v) for v in rng_state.tolist())
        return backend_for(x).multiplicative_noise(x, seed, offset, kind == "gaussian", scale)

    @staticmethod
    def backward(ctx, grad_y):
        (rng_state,) = ctx.saved_tensors
        return _MultiplicativeNoise.apply(grad_y, rng_state, *ctx.params), None, None, None


def _check_floating(input: Tensor, name: str) -> None:
    if not input.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input, got {input.dtype}")


def gaussian_dropout(
    input: Tensor, p: float = 0.5, training: bool = True, *, generator: torch.Generator | None = None
) -> Tensor:
    r"""Gaussian dropout: y = x * eps, eps ~ N(1, alpha) element-wise with alpha = p / (1 - p), the variance of
    Bernoulli dropout's ``m / (1 - p)`` (Srivastava et al. 2014, section 10). Identity in eval mode; 0 <= p < 1."""
    _check_probability(p, "gaussian dropout probability", allow_one=False)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    _check_floating(input, "gaussian_dropout")
    return _MultiplicativeNoise.apply(input, draw_rng_state(generator), "gaussian", math.sqrt(p / (1.0 - p)))


def uout(
    input: Tensor, beta: float = 0.1, training: bool = True, *, generator: torch.Generator | None = None
) -> Tensor:
    r"""Uout: y = x * (1 + r), r ~ U(-beta, beta) element-wise, so E[y] = x and Var[y | x] = x^2 beta^2 / 3 -- a
    small variance shift compared with dropout's x^2 p / (1 - p) (Li et al. 2019). Identity in eval mode;
    0 <= beta <= 1 (so the factor stays non-negative)."""
    _check_beta(beta)
    if not training or beta == 0.0 or input.numel() == 0:
        return input
    _check_floating(input, "uout")
    if not ops.graph_capture():  # small CPU inputs: one C++ autograd node, which also draws the seed
        y = fastpath.uniform_noise_drawing_seed(input, generator, float(beta))
        if y is not None:
            return y
    return _MultiplicativeNoise.apply(input, draw_rng_state(generator), "uniform", float(beta))


def drop_path(
    input: Tensor, p: float = 0.1, training: bool = True, *, generator: torch.Generator | None = None
) -> Tensor:
    r"""Drop path / stochastic depth: y[n] = x[n] * m[n] / (1 - p), one m[n] ~ Bernoulli(1 - p) per sample (dim 0),
    broadcast over the other dims. Applied to a residual branch f, ``x + drop_path(f(x))`` skips the whole block
    for a dropped sample (Huang et al. 2016); the 1 / (1 - p) scaling in training replaces the paper's scaling
    by the survival probability at test time. Identity in eval mode; 0 <= p <= 1.

    This is normdrop's dropout op with a mask over the first dim only, so the mask is regenerated in backward.
    """
    _check_probability(p, "drop path probability", allow_one=True)
    if input.ndim < 1:
        raise ValueError(f"drop_path expects an input with a batch dim, got a {input.ndim}D input")
    return F._apply_dropout(input, p, training, False, 1, False, generator)


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"DropBlock block_size must be a positive int, got {block_size!r}")


def drop_block2d(
    input: Tensor,
    p: float = 0.1,
    block_size: int = 7,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""DropBlock (Ghiasi et al. 2018, Algorithm 1) on an (N, C, H, W) input, one mask per feature map.

    Block corners are sampled in the (H - b + 1) x (W - b + 1) positions where a b x b block (b = ``block_size``)
    fits, each with probability

        gamma = p / b^2 * H W / ((H - b + 1)(W - b + 1)),

    every sampled block is zeroed, and the kept units are rescaled by numel(mask) / count_ones(mask) (over the
    whole batch). A unit covered by k possible corners is dropped with probability 1 - (1 - gamma)^k; away from
    the borders k = b^2, and the dropped fraction is close to p while blocks rarely overlap. b = 1 is dropout
    with rate p (up to the rescaling). Identity in eval mode; 0 <= p < 1 and 1 <= b <= min(H, W).
    """
    _check_probability(p, "DropBlock drop probability p", allow_one=False)
    _check_block_size(block_size)
    if input.ndim != 4:
        raise ValueError(f"drop_block2d expects a 4D (N, C, H, W) input, got a {input.ndim}D input")
    height, width = input.shape[-2:]
    if block_size > min(height, width):
        raise ValueError(
            f"DropBlock block_size must be at most min(H, W) = {min(height, width)} for a {height}x{width} "
            f"feature map, got {block_size}"
        )
    if not training or p == 0.0 or input.numel() == 0:
        return input
    _check_floating(input, "drop_block2d")
    corners_h, corners_w = height - block_size + 1, width - block_size + 1
    gamma = min(p / block_size**2 * height * width / (corners_h * corners_w), 1.0)
    corner_shape = torch.Size((*input.shape[:2], corners_h, corners_w))
    corners = (_uniform(corner_shape, draw_rng_state(generator), 0, input.device) < gamma).to(input.dtype)
    # A corner at (i, j) drops rows i .. i+b-1 and columns j .. j+b-1: a max-pool of the zero-padded corner map.
    pad = block_size - 1
    dropped = torch.nn.functional.max_pool2d(
        torch.nn.functional.pad(corners, (pad, pad, pad, pad)), block_size, stride=1
    )
    keep = 1.0 - dropped
    scale = keep.numel() / keep.sum().clamp(min=1.0)
    return input * (keep * scale)


def _drop_connect_weight(weight: Tensor, p: float, samples: int | None, generator: torch.Generator | None) -> Tensor:
    """``weight * M / (1 - p)`` with M ~ Bernoulli(1 - p): one mask, or one per sample (a (samples, out, in)
    stack). Masks come from normdrop's dropout."""
    if samples is None:
        return F.dropout(weight, p, True, generator=generator)
    ones = weight.new_ones((samples, *weight.shape)).detach()
    return weight * F.dropout(ones, p, True, generator=generator)


@fx_leaf_layer
class DropConnect(torch.nn.Linear):
    r"""A Linear layer with DropConnect on its weights (Wan et al. 2013).

    Training: y = x (W * M)^T / (1 - p) + b, M ~ Bernoulli(1 - p) element-wise over the weight matrix; the bias
    is not dropped. ``per_sample=False`` draws one mask per forward (shared by the batch, cheap);
    ``per_sample=True`` one mask per sample of an (N, in_features) input, as in the paper, at the cost of an
    (N, out, in) weight stack. Inference: y = x W^T + b, the mean network (the paper's moment-matched Gaussian
    sampling at test time is not implemented). ``DropConnect.from_linear(linear, p)`` wraps trained weights.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        p: float = 0.5,
        per_sample: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_probability(p, "DropConnect probability p", allow_one=True)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.p = float(p)
        self.per_sample = per_sample
        self.generator = generator

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, p: float = 0.5, per_sample: bool = False) -> DropConnect:
        """A DropConnect layer sharing ``linear``'s weight and bias tensors."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, p, per_sample, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return torch.nn.functional.linear(input, self.weight, self.bias)
        if not self.per_sample:
            weight = _drop_connect_weight(self.weight, self.p, None, self.generator)
            return torch.nn.functional.linear(input, weight, self.bias)
        if input.ndim != 2:
            raise ValueError(f"DropConnect with per_sample=True expects an (N, in_features) input, got {input.ndim}D")
        weights = _drop_connect_weight(self.weight, self.p, input.shape[0], self.generator)
        output = torch.bmm(weights, input.unsqueeze(-1)).squeeze(-1)
        return output if self.bias is None else output + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, per_sample={self.per_sample}"


@fx_leaf_layer
class GaussianDropout(torch.nn.Module):
    r"""Gaussian dropout: y = x * eps, eps ~ N(1, p / (1 - p)) in training, y = x in eval (Srivastava et al. 2014,
    section 10). Same mean and variance as inverted Bernoulli dropout with rate p; 0 <= p < 1."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_probability(p, "gaussian dropout probability", allow_one=False)
        self.p = float(p)
        self.generator = generator

    def forward(self, input: Tensor) -> Tensor:
        return gaussian_dropout(input, self.p, self.training, generator=self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}"


@fx_leaf_layer
class Uout(torch.nn.Module):
    r"""Uout: y = x * (1 + r), r ~ U(-beta, beta) in training, y = x in eval (Li et al. 2019); E[y] = x,
    Var[y | x] = x^2 beta^2 / 3. 0 <= beta <= 1."""

    def __init__(self, beta: float = 0.1, generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_beta(beta)
        self.beta = float(beta)
        self.generator = generator

    def forward(self, input: Tensor) -> Tensor:
        return uout(input, self.beta, self.training, generator=self.generator)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


@fx_leaf_layer
class DropPath(torch.nn.Module):
    r"""Drop path / stochastic depth (Huang et al. 2016): y[n] = x[n] * m[n] / (1 - p), m[n] ~ Bernoulli(1 - p) per
    sample, in training; y = x in eval. Put it at the end of a residual branch: ``x + drop_path(f(x))``."""

    def __init__(self, p: float = 0.1, generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_probability(p, "drop path probability", allow_one=True)
        self.p = float(p)
        self.generator = generator

    def forward(self, input: Tensor) -> Tensor:
        return drop_path(input, self.p, self.training, generator=self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}"


@fx_leaf_layer
class DropBlock2d(torch.nn.Module):
    r"""DropBlock (Ghiasi et al. 2018) on (N, C, H, W): b x b blocks of each feature map are zeroed, block corners
    drawn with rate gamma = p / b^2 * H W / ((H - b + 1)(W - b + 1)), and the rest rescaled by
    numel / count_ones. Identity in eval. See ``drop_block2d``. The paper ramps p up linearly over training: set
    ``layer.p`` from the training loop for that."""

    def __init__(self, p: float = 0.1, block_size: int = 7, generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_probability(p, "DropBlock drop probability p", allow_one=False)
        _check_block_size(block_size)
        self.p = float(p)
        self.block_size = block_size
        self.generator = generator

    def forward(self, input: Tensor) -> Tensor:
        return drop_block2d(input, self.p, self.block_size, self.training, generator=self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}, block_size={self.block_size}"


# ----------------------------------------------------------------------------------------------- concrete

_CONCRETE_EPS = 1e-7  # keeps the logarithms of p, 1 - p finite at the ends


def concrete_dropout(
    input: Tensor,
    p: Tensor,
    temperature: float = 0.1,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Concrete (relaxed Bernoulli) dropout (Gal et al. 2017), differentiable in the rate ``p`` (a 0-dim tensor):

        z = sigmoid((log p - log(1 - p) + log u - log(1 - u)) / t),   u ~ U(0, 1) element-wise
        y = x * (1 - z) / (1 - p)

    z is a relaxed "drop" indicator that tends to Bernoulli(p) as the temperature t -> 0. Identity in eval mode.
    """
    if not temperature > 0:
        raise ValueError(f"concrete dropout temperature must be positive, got {temperature}")
    if not training or input.numel() == 0:
        return input
    _check_floating(input, "concrete_dropout")
    eps = _CONCRETE_EPS
    u = _uniform(input.shape, draw_rng_state(generator), 0, input.device).to(input.dtype)
    p = p.to(input.dtype)
    logits = torch.log(p + eps) - torch.log(1 - p + eps) + torch.log(u) - torch.log(1 - u)
    drop = torch.sigmoid(logits / temperature)
    return input * (1 - drop) / (1 - p)


@fx_leaf_layer
class ConcreteDropout(torch.nn.Module):
    r"""Dropout with a learned rate (Gal, Hron & Kendall 2017, "Concrete Dropout"), applied to the input of
    ``layer`` (or on its own when ``layer`` is None).

    The rate is p = sigmoid(p_logit), a parameter trained with the rest through ``concrete_dropout``'s relaxed
    mask. Each training forward stores in ``self.regularization`` the layer's term of the objective,

        weight_regularizer * sum(theta^2) / (1 - p) + dropout_regularizer * K * (p log p + (1 - p) log(1 - p)),

    theta the parameters of ``layer``, K the number of input features per sample; add
    ``concrete_dropout_regularization(model)`` to the loss. The authors' examples take weight_regularizer =
    l^2 / N and dropout_regularizer = 2 / N for N training points and prior length-scale l. Eval mode: y = layer(x).
    """

    def __init__(
        self,
        layer: torch.nn.Module | None = None,
        init_p: float = 0.1,
        temperature: float = 0.1,
        weight_regularizer: float = 1e-6,
        dropout_regularizer: float = 1e-5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(init_p, int | float) and 0.0 < init_p < 1.0):
            raise ValueError(f"ConcreteDropout init_p has to be strictly between 0 and 1, but got {init_p!r}")
        if not temperature > 0:
            raise ValueError(f"ConcreteDropout temperature must be positive, got {temperature}")
        if weight_regularizer < 0 or dropout_regularizer < 0:
            raise ValueError(
                f"ConcreteDropout regularizers must be non-negative, got weight_regularizer={weight_regularizer}, "
                f"dropout_regularizer={dropout_regularizer}"
            )
        self.layer = layer
        self.p_logit = torch.nn.Parameter(torch.tensor(math.log(init_p) - math.log1p(-init_p)))
        self.temperature = temperature
        self.weight_regularizer = weight_regularizer
        self.dropout_regularizer = dropout_regularizer
        self.generator = generator
        self.regularization: Tensor | None = None

    def __getstate__(self) -> dict:
        # The stored regularization term belongs to an autograd graph, which can be neither copied nor pickled:
        # a deep copy or a pickled model starts without it.
        state = super().__getstate__()
        return {**state, "regularization": None}

    @property
    def p(self) -> Tensor:
        """The current dropout rate sigmoid(p_logit)."""
        return torch.sigmoid(self.p_logit)

    def forward(self, input: Tensor) -> Tensor:
        if self.training:
            p = self.p
            input = concrete_dropout(input, p, self.temperature, True, generator=self.generator)
            features = input[0].numel() if input.ndim > 0 else 1
            weight_norm = self.p_logit.new_zeros(())
            if self.layer is not None:
                for param in self.layer.parameters():
                    weight_norm = weight_norm + param.pow(2).sum()
            entropy_term = p * torch.log(p) + (1 - p) * torch.log1p(-p)
            self.regularization = (
                self.weight_regularizer * weight_norm / (1 - p) + self.dropout_regularizer * features * entropy_term
            )
        return input if self.layer is None else self.layer(input)

    def extra_repr(self) -> str:
        return (
            f"p={self.p.item():.4g}, temperature={self.temperature}, weight_regularizer={self.weight_regularizer}, "
            f"dropout_regularizer={self.dropout_regularizer}"
        )


def concrete_dropout_regularization(model: torch.nn.Module) -> Tensor:
    """The sum of the ``regularization`` terms of every ConcreteDropout in ``model`` from its last training forward
    (0 when there is none)."""
    total = torch.zeros(())
    for module in model.modules():
        if isinstance(module, ConcreteDropout) and module.regularization is not None:
            total = total.to(module.regularization.device) + module.regularization
    return total


DROPOUT_LAYER_TYPES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.modules.dropout._DropoutNd,
    GaussianDropout,
    Uout,
    DropPath,
    DropBlock2d,
    DropConnect,
    ConcreteDropout,
)
"""Every module type whose train/eval mode switches random dropping on and off (torch's and normdrop's dropout
layers included): what MC-dropout prediction sets to train mode and model surgery treats as "dropout"."""
