"""normdrop: batch normalization and dropout, written out by hand, trained and measured.

- ``normdrop.nn``: drop-in replacements for torch.nn's BatchNorm and Dropout layers (and variants).
- ``normdrop.data``, ``normdrop.models``, ``normdrop.train``: the lab that trains small networks reproducibly.
- ``normdrop.store``, ``normdrop.sweep``: where runs are kept and how many are launched.
"""

__version__ = "0.1.0"
