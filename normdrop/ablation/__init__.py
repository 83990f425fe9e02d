"""``normdrop ablate``: the claims of CLAIMS.md tested on the user's own model and data (see docs/ablate.md).

- :mod:`normdrop.ablation.inputs`: the user's data and model, checked and fingerprinted;
- :mod:`normdrop.ablation.arms`: arms made by surgery on the model (knobs, "not applicable" reasons);
- :mod:`normdrop.ablation.claims`: the claims ablate tests, and those it does not yet;
- :mod:`normdrop.ablation.engine`: :func:`ablate` (plan, runs into the store, verdicts, report).
"""

from normdrop.ablation.engine import AblationOutcome, ClaimOutcome, ablate
from normdrop.ablation.inputs import UserInputError

__all__ = ["AblationOutcome", "ClaimOutcome", "UserInputError", "ablate"]
