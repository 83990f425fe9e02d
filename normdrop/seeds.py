"""Seeds of a run's random streams: one user-facing seed, one independent generator seed per stream."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed for one random stream of a run (``"init"``, ``"batch_order"``, ``"dropout"``).

    One user-facing ``seed`` feeds several generators; hashing it with the stream's name keeps, say, the dropout
    masks from replaying the random numbers that drew the initial weights:
    ``derive_seed(s, name) = int(sha256(f"{s}:{name}")[:8], little endian) >> 1``.
    """
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
