"""Statistical quality of the dropout masks' random bits (``normdrop.nn.rng``'s counter hash).

A mask is ``keep_i = bits(seed, offset + i) >= drop_threshold(p)``; under the ideal model the keep indicators are
independent Bernoulli(q) variables, q = 1 - drop_threshold(p) / 2**32, for every seed, offset and position, and the
32 raw bits are independent fair coins. Each check below computes statistics whose distribution under that model
is known and fails when one falls outside its bound:

- ``check_keep_rate``: the keep count of each of 256 (seed, offset) windows against exact binomial quantiles, the
  pooled count (z), and the spread of the counts (a two-sided chi-square of their z-scores: a generator that is
  *too regular*, like a Weyl sequence, fails on the low side);
- ``check_neighbours``: lag-k correlation of keep indicators for k = 1..8 and strides up to 2**16 (z), a 2x2
  contingency chi-square of adjacent pairs, and chi-square goodness of fit of non-overlapping 2-, 4- and 8-tuples;
- ``check_across_seeds``: correlation of the masks of seeds s and s + 1, of s and s ^ 2**j for every bit j of the
  seed (xor-related seeds), and of s and s + gamma (one SplitMix64 step apart, so their round keys share a SplitMix
  output, k2(s) = k0(s + gamma)), at the same offset;
- ``check_across_offsets``: correlation of the masks at offsets o and o + d of one seed, for non-overlapping d up to
  2**61, including d = 2**32 (the same low counter word, the next high word) and windows straddling 2**32;
- ``check_position``: keep counts per position over 4096 seeds (random ones, and 0..4095) at offset 0 (where every
  layer's mask starts) and straddling 2**32, and per bucket of a long mask, against uniform (chi-square, max |z|);
- ``check_bit_balance``: ones per raw bit (z, chi-square) and the joint distribution of adjacent bits of a word.

Thresholds. The seeds and offsets are fixed (``np.random.default_rng([SEED, stream])``), so the tests are
reproducible. Every bound is set so that an ideal generator fails it with probability at most ``FALSE_FAILURE =
1e-6`` over the whole family of m statistics it applies to (Bonferroni): |z| < ``norm.isf(1e-6 / (2 m))`` (4.9 for
m = 1; 5.2 to 6.2 here), chi-square in (``chi2.ppf(1e-6 / (2 m), df)``, ``chi2.isf(1e-6 / (2 m), df)``), of which
only the upper bound applies where a too-small value means nothing wrong, and exact binomial quantiles for keep
counts. Correlations use the known q, so r * sqrt(n) has variance exactly 1 under the model. The counter hash is
far from these bounds: when these tests were written it also passed every check at a 5% false-failure level, as
did an ideal generator (numpy's PCG64 with fresh bits per window).

Each check can fail. ``test_a_bad_generator_fails`` runs every check on deliberately bad generators and asserts
that the ones it should catch are caught: the identity hash (bits = counter), a Weyl sequence (uniform but too
regular), a linear xorshift mixer, a seed xored in after the mixing, the hash without the counter's high word, and a
modulo range reduction (biased bits).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import stats

from normdrop.nn import rng
from normdrop.nn.kernels import composite

FALSE_FAILURE = 1e-6
SEED = 20251125
TWO_32 = 2**32
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's state increment (rng.splitmix64)

# A generator: (seed, offset, count) -> the 32-bit words for counters offset .. offset + count - 1, as uint32.
Generator = Callable[[int, int, int], np.ndarray]


def counter_hash(seed: int, offset: int, count: int) -> np.ndarray:
    """The generator under test: the library's own (composite backend; numba's masks are bit-identical to it)."""
    return composite.counter_bits(seed, offset, count, torch.device("cpu")).numpy().astype(np.uint32)


# ------------------------------------------------------------------------------------- deliberately bad generators


def _counters(offset: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    counter = np.arange(offset, offset + count, dtype=np.int64)
    return (counter & rng.MASK32).astype(np.uint32), (counter >> 32).astype(np.uint32)


def _mix32(x: np.ndarray) -> np.ndarray:
    """``rng.mix32`` on a uint32 array (numpy's uint32 products wrap modulo 2**32)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(rng.MIX_MULTIPLIER_1)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(rng.MIX_MULTIPLIER_2)
    return x ^ (x >> np.uint32(15))


def identity_hash(seed: int, offset: int, count: int) -> np.ndarray:
    """bits = the counter's low word: ignores the seed, and neighbours are consecutive numbers."""
    return _counters(offset, count)[0]


def weyl_sequence(seed: int, offset: int, count: int) -> np.ndarray:
    """bits = k0 + counter * golden-ratio constant (mod 2**32): uniform marginals, far too regular."""
    low, _ = _counters(offset, count)
    return np.uint32(rng.round_keys(seed)[0]) + low * np.uint32(0x9E3779B9)


def xorshift_mixer(seed: int, offset: int, count: int) -> np.ndarray:
    """A linear (over GF(2)) xorshift of counter ^ key: flipping a counter bit flips fixed output bits."""
    low, high = _counters(offset, count)
    k0, k1, _ = rng.round_keys(seed)
    x = low ^ np.uint32(k0) ^ (high * np.uint32(0x85EBCA6B)) ^ np.uint32(k1)
    x = x ^ (x << np.uint32(13))
    x = x ^ (x >> np.uint32(17))
    return x ^ (x << np.uint32(5))


def seed_after_mixing(seed: int, offset: int, count: int) -> np.ndarray:
    """A well-mixed counter xored with the raw seed at the end: seeds s and s + 1 give nearly the same masks."""
    low, high = _counters(offset, count)
    return _mix32(_mix32(low) ^ high) ^ np.uint32(seed & rng.MASK32)


def low_word_only(seed: int, offset: int, count: int) -> np.ndarray:
    """The counter hash without the counter's high word: masks repeat every 2**32 counters."""
    low, _ = _counters(offset, count)
    k0, k1, k2 = (np.uint32(k) for k in rng.round_keys(seed))
    return _mix32(_mix32(_mix32(low ^ k0) ^ k1) ^ k2)


def modulo_reduced(seed: int, offset: int, count: int) -> np.ndarray:
    """Good bits reduced modulo 3 * 10**9 (a range-reduction bug): values above it never occur."""
    return counter_hash(seed, offset, count) % np.uint32(3_000_000_000)


# Which checks must catch which bad generator (each check is caught failing at least once).
BAD_GENERATORS: dict[str, tuple[Generator, tuple[str, ...]]] = {
    "identity": (identity_hash, ("keep_rate", "neighbours", "seeds", "offsets", "position", "bits")),
    "weyl": (weyl_sequence, ("keep_rate", "neighbours")),
    "xorshift": (xorshift_mixer, ("neighbours",)),
    "seed_after_mixing": (seed_after_mixing, ("seeds", "position")),
    "low_word_only": (low_word_only, ("offsets",)),
    "modulo": (modulo_reduced, ("keep_rate", "bits")),
}


# ------------------------------------------------------------------------------------------------ statistics


def z_bound(statistics: int) -> float:
    """|z| bound for a family of ``statistics`` standard normal statistics (Bonferroni, two-sided)."""
    return float(stats.norm.isf(FALSE_FAILURE / (2 * statistics)))


def chi2_bounds(df: int, statistics: int = 1) -> tuple[float, float]:
    """(low, high) quantiles of chi2(df) that a family of ``statistics`` chi-squares leaves with FALSE_FAILURE."""
    tail = FALSE_FAILURE / (2 * statistics)
    return float(stats.chi2.ppf(tail, df)), float(stats.chi2.isf(tail, df))


def keep_probability(p: float) -> float:
    """The exact keep probability of a mask at drop rate p: 1 - drop_threshold(p) / 2**32."""
    return 1.0 - rng.drop_threshold(p) / TWO_32


def keep_mask(generator: Generator, seed: int, offset: int, count: int, p: float) -> np.ndarray:
    return generator(seed, offset, count) >= np.uint32(rng.drop_threshold(p))


def correlation_z(x: np.ndarray, y: np.ndarray, q: float) -> float:
    """sqrt(n) * correlation of two Bernoulli(q) indicator arrays, with the known mean and variance: N(0, 1)
    when they are independent."""
    centered_x, centered_y = x - q, y - q
    return float(np.mean(centered_x * centered_y) / (q * (1 - q)) * np.sqrt(x.size))


def chi2_goodness(counts: np.ndarray, probabilities: np.ndarray) -> float:
    expected = probabilities * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def draw_seeds(count: int, stream: int) -> list[int]:
    """``count`` reproducible seeds from [0, SEED_BOUND) (``stream`` picks an independent list)."""
    return [int(s) for s in np.random.default_rng([SEED, stream]).integers(0, rng.SEED_BOUND, count)]


def draw_offsets(count: int, stream: int, window: int) -> list[int]:
    """Offsets for windows of ``window`` counters: 0, one straddling 2**32, one near the top, then random ones."""
    randoms = np.random.default_rng([SEED, stream]).integers(0, 2**62, count)
    fixed = [0, TWO_32 - window // 2, 2**62 - window]
    return (fixed + [int(o) for o in randoms])[:count]


# ----------------------------------------------------------------------------------------------------- checks
# Each check returns the list of its failed statistics (empty: the generator passes).


def check_keep_rate(generator: Generator) -> list[str]:
    windows, count, rates = 256, 4096, (0.1, 0.3, 0.5, 0.9)
    seeds, offsets = draw_seeds(windows, 1), draw_offsets(windows, 2, count)
    failures = []
    for p in rates:
        q = keep_probability(p)
        kept = np.array([keep_mask(generator, s, o, count, p).sum() for s, o in zip(seeds, offsets, strict=True)])
        tail = FALSE_FAILURE / (2 * windows * len(rates))
        low, high = stats.binom.ppf(tail, count, q), stats.binom.isf(tail, count, q)
        if np.any((kept < low) | (kept > high)):
            failures.append(f"p={p}: window keep counts {kept.min()}..{kept.max()} outside [{low:.0f}, {high:.0f}]")
        z = (kept - count * q) / np.sqrt(count * q * (1 - q))
        pooled = z.sum() / np.sqrt(windows)
        if abs(pooled) > z_bound(len(rates)):
            failures.append(f"p={p}: pooled keep rate z = {pooled:.1f}")
        spread_low, spread_high = chi2_bounds(windows, len(rates))
        spread = float((z**2).sum())
        if not spread_low < spread < spread_high:
            failures.append(
                f"p={p}: spread of keep counts chi2 = {spread:.0f} outside ({spread_low:.0f}, {spread_high:.0f})"
            )
    return failures


NEIGHBOUR_LAGS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 31, 32, 33, 64, 100, 128, 256, 1000, 1024, 4096, 65536)


def check_neighbours(generator: Generator) -> list[str]:
    count, rates = 2**20, (0.5, 0.3)
    windows = list(zip(draw_seeds(3, 3), draw_offsets(3, 4, count), strict=True))
    failures = []
    bound = z_bound(len(windows) * len(rates) * len(NEIGHBOUR_LAGS))
    pair_bound = chi2_bounds(1, len(windows) * len(rates))[1]
    tuple_sizes = (2, 4, 8)
    for seed, offset in windows:
        for p in rates:
            q = keep_probability(p)
            keep = keep_mask(generator, seed, offset, count, p).astype(np.float64)
            for lag in NEIGHBOUR_LAGS:
                z = correlation_z(keep[:-lag], keep[lag:], q)
                if abs(z) > bound:
                    failures.append(f"seed {seed} offset {offset} p={p}: lag-{lag} correlation z = {z:.1f}")
            # Adjacent non-overlapping pairs: a 2x2 contingency table, independence chi-square (1 df).
            pairs = keep.reshape(-1, 2).astype(bool)
            table = np.array(
                [[np.sum(~pairs[:, 0] & ~pairs[:, 1]), np.sum(~pairs[:, 0] & pairs[:, 1])],
                 [np.sum(pairs[:, 0] & ~pairs[:, 1]), np.sum(pairs[:, 0] & pairs[:, 1])]]
            )  # fmt: skip
            if (table.sum(axis=0) == 0).any() or (table.sum(axis=1) == 0).any():
                failures.append(f"seed {seed} offset {offset} p={p}: every unit of every pair has one value")
                continue
            chi2 = stats.chi2_contingency(table, correction=False).statistic
            if chi2 > pair_bound:
                failures.append(f"seed {seed} offset {offset} p={p}: adjacent pairs contingency chi2 = {chi2:.1f}")
        # Non-overlapping t-tuples at p = 1/2: 2**t equally likely patterns.
        keep = keep_mask(generator, seed, offset, count, 0.5)
        for size in tuple_sizes:
            codes = keep.reshape(-1, size) @ (1 << np.arange(size))
            observed = np.bincount(codes, minlength=2**size)
            chi2 = chi2_goodness(observed, np.full(2**size, 1 / 2**size))
            low, high = chi2_bounds(2**size - 1, len(windows) * len(tuple_sizes))
            if not low < chi2 < high:
                failures.append(
                    f"seed {seed} offset {offset}: {size}-tuples chi2 = {chi2:.0f} outside ({low:.0f}, {high:.0f})"
                )
    return failures


def _pair_correlations(generator: Generator, pairs: list[tuple[int, int, int, int]], count: int) -> list[str]:
    """Correlation z of the p = 1/2 and p = 0.3 masks of each ((seed, offset), (seed', offset')) pair."""
    failures, rates = [], (0.5, 0.3)
    bound = z_bound(len(pairs) * len(rates))
    squares = {p: 0.0 for p in rates}
    for seed_a, offset_a, seed_b, offset_b in pairs:
        words_a, words_b = generator(seed_a, offset_a, count), generator(seed_b, offset_b, count)
        for p in rates:
            threshold, q = np.uint32(rng.drop_threshold(p)), keep_probability(p)
            z = correlation_z(words_a >= threshold, words_b >= threshold, q)
            squares[p] += z * z
            if abs(z) > bound:
                failures.append(f"({seed_a}, {offset_a}) vs ({seed_b}, {offset_b}) p={p}: correlation z = {z:.1f}")
    for p, total in squares.items():
        high = chi2_bounds(len(pairs), len(rates))[1]
        if total > high:
            failures.append(f"p={p}: sum of squared correlation z over {len(pairs)} pairs = {total:.0f} > {high:.0f}")
    return failures


def check_across_seeds(generator: Generator) -> list[str]:
    count = 2**16
    pairs = []
    for seed, offset in zip(draw_seeds(16, 5), draw_offsets(16, 6, count), strict=True):
        pairs.append((seed, offset, seed + 1, offset))
    for seed in draw_seeds(2, 7):
        pairs += [(seed, 0, seed ^ (1 << bit), 0) for bit in range(62)]  # seeds are below 2**62
    pairs += [(s, 0, s + 1, 0) for s in range(8)]  # small consecutive seeds, as a user might pick
    # Seeds one SplitMix64 step apart share a SplitMix output: k2(s) = k0(s + gamma).
    pairs += [(s, 0, (s + SPLITMIX_GAMMA) & rng.MASK64, 0) for s in draw_seeds(8, 12)]
    return _pair_correlations(generator, pairs, count)


def check_across_offsets(generator: Generator) -> list[str]:
    count = 2**16
    distances = (count, 3 * count, 2**31, TWO_32, TWO_32 + 1, TWO_32 + count, 2**33, 3 * TWO_32, 2**40, 2**61)
    pairs = []
    for seed, offset in zip(draw_seeds(4, 8), [0, TWO_32 - count // 2, 12345, 2**50 + 7], strict=True):
        pairs += [(seed, offset, seed, offset + distance) for distance in distances]
    return _pair_correlations(generator, pairs, count)


def check_position(generator: Generator) -> list[str]:
    failures = []
    rates = (0.5, 0.1)
    # Per position of the first 256 counters of a window, over 4096 seeds: random ones (what layers draw) and
    # 0..4095 (structured seeds must not give structured masks either).
    seed_sets, positions = {"random": draw_seeds(4096, 9), "consecutive": list(range(4096))}, 256
    families = len(seed_sets) * 2 * len(rates)
    for seed_set, seeds in seed_sets.items():
        for offset in (0, TWO_32 - positions // 2):
            words = np.stack([generator(seed, offset, positions) for seed in seeds])
            for p in rates:
                q = keep_probability(p)
                kept = (words >= np.uint32(rng.drop_threshold(p))).sum(axis=0)
                z = (kept - len(seeds) * q) / np.sqrt(len(seeds) * q * (1 - q))
                where = f"{seed_set} seeds, offset {offset}, p={p}"
                worst = int(np.abs(z).argmax())
                if abs(z[worst]) > z_bound(positions * families):
                    failures.append(f"{where}: keep rate at position {worst}: z = {z[worst]:.1f}")
                high = chi2_bounds(positions, families)[1]
                if (z**2).sum() > high:
                    failures.append(f"{where}: keep rate per position chi2 = {(z**2).sum():.0f} > {high:.0f}")
    # Per bucket of a long mask (a trend along it), over a few seeds.
    buckets, length = 64, 2**16
    for p in rates:
        q = keep_probability(p)
        kept = sum(
            keep_mask(generator, seed, 0, length, p).reshape(buckets, -1).sum(axis=1)
            for seed in seed_sets["random"][:64]
        )
        trials = 64 * length // buckets
        chi2 = float((((kept - trials * q) ** 2) / (trials * q * (1 - q))).sum())
        high = chi2_bounds(buckets, len(rates))[1]
        if chi2 > high:
            failures.append(f"p={p}: keep rate per bucket of a {length}-long mask chi2 = {chi2:.0f} > {high:.0f}")
    return failures


def check_bit_balance(generator: Generator) -> list[str]:
    failures = []
    count = 2**18
    windows = list(zip(draw_seeds(4, 10), draw_offsets(4, 11, count), strict=True))
    words = np.concatenate([generator(seed, offset, count) for seed, offset in windows])
    bits = (words[:, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)
    ones = bits.sum(axis=0, dtype=np.int64)
    z = (ones - words.size / 2) / np.sqrt(words.size / 4)
    if np.abs(z).max() > z_bound(32):
        failures.append(f"bit {np.abs(z).argmax()}: share of ones z = {z[np.abs(z).argmax()]:.1f}")
    high = chi2_bounds(32)[1]
    if (z**2).sum() > high:
        failures.append(f"ones per bit chi2 = {(z**2).sum():.0f} > {high:.0f}")
    # Adjacent bits of a word: four equally likely patterns (3 df), for each of the 31 pairs.
    low, high = chi2_bounds(3, 31)
    for bit in range(31):
        observed = np.bincount(bits[:, bit] + 2 * bits[:, bit + 1], minlength=4)
        chi2 = chi2_goodness(observed, np.full(4, 0.25))
        if not low < chi2 < high:
            failures.append(f"bits {bit}, {bit + 1}: joint patterns chi2 = {chi2:.0f} outside ({low:.1f}, {high:.0f})")
    return failures


CHECKS: dict[str, Callable[[Generator], list[str]]] = {
    "keep_rate": check_keep_rate,
    "neighbours": check_neighbours,
    "seeds": check_across_seeds,
    "offsets": check_across_offsets,
    "position": check_position,
    "bits": check_bit_balance,
}


# ------------------------------------------------------------------------------------------------------ tests


def test_the_generator_under_test_is_the_specification():
    """The statistics below are about ``rng.counter_bits``: composite's bits, which every backend's masks use."""
    for seed, offset in [(0, 0), (2**61 + 3, TWO_32 - 2)]:
        assert counter_hash(seed, offset, 4).tolist() == [rng.counter_bits(seed, offset + i) for i in range(4)]
    # The bad generators built on the hash's pieces use them correctly (low_word_only equals it below 2**32).
    assert np.array_equal(low_word_only(5, 0, 1000), counter_hash(5, 0, 1000))


@pytest.mark.parametrize("check", list(CHECKS))
def test_counter_hash_passes(check: str) -> None:
    assert CHECKS[check](counter_hash) == []


@pytest.mark.parametrize(
    ("bad", "check"), [(bad, check) for bad, (_, caught_by) in BAD_GENERATORS.items() for check in caught_by]
)
def test_a_bad_generator_fails(bad: str, check: str) -> None:
    generator, _ = BAD_GENERATORS[bad]
    assert CHECKS[check](generator), f"check {check!r} does not catch the {bad} generator"
