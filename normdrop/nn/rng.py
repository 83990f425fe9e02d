"""Counter-based random bits for dropout masks.

A dropout mask is a pure function of a ``(seed, offset)`` pair: element ``i`` of the mask (in the row-major
order of the mask's logical shape, whatever the memory layout) is kept iff ``bits(seed, offset + i) >= threshold(p)``.
Because nothing but the pair is needed to rebuild the mask, backward regenerates it instead of keeping a tensor the
size of the input, and every backend (the torch composite in ``kernels/composite.py``, a fast CPU kernel) must
produce the same bits for the same pair.

The bit generator is a keyed integer hash in the style of counter-based generators (Salmon et al. 2011, "Parallel
random numbers: as easy as 1, 2, 3"): the 64-bit seed is expanded into three 32-bit round keys with SplitMix64, and
the 64-bit counter ``c`` is hashed as

    h = mix(mix(mix(lo(c) ^ k0) ^ hi(c) ^ k1) ^ k2)

where ``mix`` is a 32-bit avalanche permutation (xor-shift / odd-multiply, constants from Wellons'
hash-prospector). For a fixed key and ``hi(c)``, ``lo(c) -> h`` is a bijection, so no two counters of a block of
2**32 collide. The multipliers are below 2**31, so every product of a 32-bit value fits in a signed 64-bit integer
and the hash is exact in int64 arithmetic on any device.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
MIX_MULTIPLIER_1 = 0x21F0AAAD
MIX_MULTIPLIER_2 = 0x735A2D97
SEED_BOUND = 2**62  # seeds are drawn from [0, SEED_BOUND); counters (offset + index) stay below 2**63


def splitmix64(state: int) -> tuple[int, int]:
    """One SplitMix64 step (Steele et al. 2014): returns (next_state, output), both 64-bit."""
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def round_keys(seed: int) -> tuple[int, int, int]:
    """Expand a seed into the three 32-bit round keys (k0, k1, k2) of the counter hash."""
    state, a = splitmix64(seed)
    _, b = splitmix64(state)
    return a & MASK32, a >> 32, b & MASK32


def mix32(x: int) -> int:
    """The 32-bit avalanche permutation on a Python int (the reference for the tensor versions)."""
    x ^= x >> 16
    x = (x * MIX_MULTIPLIER_1) & MASK32
    x ^= x >> 15
    x = (x * MIX_MULTIPLIER_2) & MASK32
    x ^= x >> 15
    return x


def counter_bits(seed: int, counter: int) -> int:
    """The 32 random bits for one counter, in plain Python: the specification every backend must match."""
    k0, k1, k2 = round_keys(seed)
    h = mix32((counter & MASK32) ^ k0)
    h = mix32(h ^ (counter >> 32) ^ k1)
    return mix32(h ^ k2)


def drop_threshold(p: float) -> int:
    """An element is dropped iff its 32 bits are below this: P(drop) = round(p * 2**32) / 2**32."""
    return min(round(p * 2**32), 2**32)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """Draw a fresh mask seed in [0, SEED_BOUND) from ``generator`` (or torch's default CPU generator, so
    ``torch.manual_seed`` makes masks reproducible, and the same seed gives the same mask on every device)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, SEED_BOUND, (1,), generator=generator, device=device, dtype=torch.int64).item())


def rng_state(seed: int, offset: int = 0) -> torch.Tensor:
    """The ``(seed, offset)`` pair as the int64 tensor of shape (2,) the custom ops take; the offset exists so a
    caller can carve several masks out of one seed."""
    return torch.tensor([seed, offset], dtype=torch.int64)


def draw_rng_state_tensor(generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh ``(seed, 0)`` pair drawn as :func:`draw_seed` draws it (the same ``torch.randint`` call, so the same
    seed for the same generator state), kept as a tensor: no ``.item()``, so graph capture (``torch.export``,
    ``torch.compile``, ``torch.jit.trace``) records the draw instead of a constant or a data-dependent guard, and
    under ``torch.func.vmap(randomness="different")`` each batch element gets its own seed."""
    device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, SEED_BOUND, (1,), generator=generator, device=device, dtype=torch.int64)
    return torch.cat([seed, torch.zeros_like(seed)])


def draw_rng_state(generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw a fresh ``(seed, 0)`` pair (:func:`rng_state`), the seed from :func:`draw_seed`."""
    return rng_state(draw_seed(generator))
