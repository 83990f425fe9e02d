"""normdrop.nn: batch norm and dropout layers, drop-in replacements for torch.nn's, with the math written out
by hand (``normdrop.nn.functional``) and fast kernels (``normdrop.nn.kernels``)."""

from normdrop.nn import functional
from normdrop.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normdrop.nn.dropout import AlphaDropout, Dropout, Dropout1d, Dropout2d, Dropout3d, FeatureAlphaDropout

__all__ = [
    "AlphaDropout",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "FeatureAlphaDropout",
    "functional",
]
