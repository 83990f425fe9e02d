"""normdrop.nn: batch norm and dropout layers, drop-in replacements for torch.nn's, with the math written out
by hand (``normdrop.nn.functional``) and fast kernels (``normdrop.nn.kernels``)."""

from normdrop.nn import functional
from normdrop.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normdrop.nn.batchnorm_variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    NoisyBatchNorm1d,
    NoisyBatchNorm2d,
)
from normdrop.nn.dropout import AlphaDropout, Dropout, Dropout1d, Dropout2d, Dropout3d, FeatureAlphaDropout
from normdrop.nn.dropout_variants import (
    ConcreteDropout,
    DropBlock2d,
    DropConnect,
    DropPath,
    GaussianDropout,
    Uout,
    concrete_dropout_regularization,
)
from normdrop.nn.factory import dropout_names, make_dropout, make_norm, norm_names
from normdrop.nn.inference import fold_batch_norm, fold_batch_norm_into, recalibrate_bn
from normdrop.nn.surgery import (
    add_dropout,
    add_norm,
    convert,
    convert_frozen_batchnorm,
    remove_dropout,
    remove_norm,
    replace_dropout,
    replace_norm,
)
from normdrop.nn.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

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
__all__ += [  # variants, inference tools, model surgery and the layer factory
    "BatchRenorm1d",
    "BatchRenorm2d",
    "ConcreteDropout",
    "DropBlock2d",
    "DropConnect",
    "DropPath",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GaussianDropout",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "SyncBatchNorm",
    "Uout",
    "add_dropout",
    "add_norm",
    "concrete_dropout_regularization",
    "convert",
    "convert_frozen_batchnorm",
    "convert_sync_batchnorm",
    "dropout_names",
    "fold_batch_norm",
    "fold_batch_norm_into",
    "make_dropout",
    "make_norm",
    "norm_names",
    "recalibrate_bn",
    "remove_dropout",
    "remove_norm",
    "replace_dropout",
    "replace_norm",
]
