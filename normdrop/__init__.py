"""normdrop: batch normalization and dropout, written out by hand, trained and measured.

- ``normdrop.nn``: drop-in replacements for torch.nn's BatchNorm and Dropout layers (and variants).
- ``normdrop.data``, ``normdrop.models``, ``normdrop.train``: the lab that trains small networks reproducibly.
- ``normdrop.store``, ``normdrop.sweep``: where runs are kept and how many are launched.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``normdrop.ablate`` (the function) without importing torch when ``normdrop`` is imported."""
    if name == "ablate":
        from normdrop.ablation import ablate

        return ablate
    raise AttributeError(f"module 'normdrop' has no attribute {name!r}")
