"""Resamplers: `(key, log_weights, n) -> ancestors`, pure and jittable.

Each draws `n` ancestor indices (int32, values in `[0, len(log_weights))`) from
unnormalized log weights. All four are unbiased: the offspring count of particle `i`
(how many times `i` appears in the result) has expectation `n * w_i`, where `w` are the
normalized weights. They differ in the variance of the counts: multinomial draws i.i.d.
from the weights (the largest variance); stratified, systematic and residual
resampling correlate the draws so that a count never strays far from `n * w_i`, which
lowers the Monte Carlo error of a particle filter.

All four invert the weights' cumulative distribution function at `n` points in [0, 1).
Stratified and systematic points come sorted, so the inversion is a histogram and a
cumulative sum, O(N + n); multinomial and residual draws use a binary search each
(`jnp.searchsorted`), O(N + n log N). Particles keep their original order (ancestors
are non-decreasing, except multinomial's).
A particle of weight zero (log weight -inf) is never drawn. If every log weight is
-inf the weights are undefined; the resamplers then draw uniformly (a particle filter
reports such a step itself, see `particle_filter`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["multinomial", "systematic", "stratified", "residual", "RESAMPLERS", "get_resampler"]


def multinomial(key, log_weights, n: int):
    """Multinomial resampling: `n` i.i.d. draws of an index with probability `w_i`.

    Args:
      key: a `jax.random` key.
      log_weights: [N] unnormalized log weights.
      n: the number of draws, a static int.

    Returns ancestors [n] int32. Offspring counts are Multinomial(n, w): unbiased,
    Var[count_i] = n w_i (1 - w_i).

    >>> a = multinomial(jax.random.key(0), jnp.log(jnp.array([0.25, 0.75])), 4)
    >>> a.shape, a.dtype
    ((4,), dtype('int32'))
    """
    u = jax.random.uniform(key, (n,))
    return _invert_cdf(log_weights, u)


def stratified(key, log_weights, n: int):
    """Stratified resampling: one uniform in each of the `n` strata [k/n, (k+1)/n).

    Args:
      key: a `jax.random` key.
      log_weights: [N] unnormalized log weights.
      n: the number of draws, a static int.

    Returns ancestors [n] int32, non-decreasing. Unbiased: E[count_i] = n w_i, and the
    count of `i` lies within one of the number of strata its weight interval touches.

    >>> stratified(jax.random.key(0), jnp.log(jnp.array([0.25, 0.75])), 4).tolist()
    [0, 1, 1, 1]
    """
    offsets = jax.random.uniform(key, (n,))
    # The first point at or past particle i's cdf value x = n c_i: stratum floor(x) when
    # its uniform reaches frac(x), else the next one.
    x = n * _cdf(log_weights)
    k = jnp.floor(x)
    first = k + (offsets[jnp.clip(k, 0, n - 1).astype(jnp.int32)] < x - k)
    return _from_first_points(first, n)


def systematic(key, log_weights, n: int):
    """Systematic resampling: one uniform offset, `n` evenly spaced points on the weight CDF.

    Args:
      key: a `jax.random` key.
      log_weights: [N] unnormalized log weights.
      n: the number of draws, a static int.

    Returns ancestors [n] int32, non-decreasing. Unbiased: E[count_i] = n w_i, and
    count_i is floor(n w_i) or ceil(n w_i), the smallest possible spread.

    >>> systematic(jax.random.key(0), jnp.log(jnp.array([0.25, 0.75])), 4).tolist()
    [0, 1, 1, 1]
    """
    offset = jax.random.uniform(key, ())
    # The first point (k + offset) / n at or past particle i's cdf value c_i.
    first = jnp.ceil(n * _cdf(log_weights) - offset)
    return _from_first_points(first, n)


def residual(key, log_weights, n: int):
    """Residual resampling: floor(n w_i) copies of each `i`, the rest drawn multinomially.

    The `R = n - sum_i floor(n w_i)` remaining ancestors are i.i.d. draws with
    probability proportional to the residuals `n w_i - floor(n w_i)`.

    Args:
      key: a `jax.random` key.
      log_weights: [N] unnormalized log weights.
      n: the number of draws, a static int.

    Returns ancestors [n] int32: first the deterministic copies in order, then the
    residual draws. Unbiased: E[count_i] = n w_i, Var[count_i] = R r_i (1 - r_i) with r
    the normalized residuals.

    >>> residual(jax.random.key(0), jnp.log(jnp.array([0.25, 0.75])), 4).tolist()
    [0, 1, 1, 1]
    """
    w = _normalized(log_weights)
    expected = n * w
    copies = jnp.floor(expected)
    # Copies by inverting the CDF of the counts at 0, 1, ..., n - 1 (side="right" skips
    # particles with no copy); positions past the last copy take the residual draws.
    cum = jnp.cumsum(copies)
    slots = jnp.arange(n, dtype=cum.dtype)
    deterministic = jnp.searchsorted(cum, slots, side="right")
    rest = multinomial(key, _log(expected - copies), n)
    out = jnp.where(slots < cum[-1], deterministic, rest)
    return jnp.clip(out, 0, w.shape[0] - 1).astype(jnp.int32)


RESAMPLERS = {"multinomial": multinomial, "systematic": systematic, "stratified": stratified,
              "residual": residual}


def get_resampler(resampling, where: str):
    """The resampler named by `resampling` (a name in RESAMPLERS, or a callable)."""
    from ppl import ArgumentError

    if callable(resampling):
        return resampling
    if isinstance(resampling, str) and resampling in RESAMPLERS:
        return RESAMPLERS[resampling]
    names = ", ".join(repr(k) for k in RESAMPLERS)
    raise ArgumentError(
        f"{where}: unknown resampling {resampling!r}. Use one of {names}, or pass a function "
        "(key, log_weights [N], n) -> ancestors [n] int32 such as smc.systematic."
    )


# -- helpers -------------------------------------------------------------------------------


def _normalized(log_weights):
    """[N] weights summing to one; uniform when every log weight is -inf."""
    log_weights = jnp.asarray(log_weights)
    w = jax.nn.softmax(log_weights)
    return jnp.where(jnp.all(jnp.isneginf(log_weights)), 1.0 / log_weights.shape[0], w)


def _log(x):
    return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), -jnp.inf)


def _cdf(log_weights):
    """[N] the normalized weights' cumulative sums, the last exactly 1."""
    cdf = jnp.cumsum(_normalized(log_weights))
    return cdf / cdf[-1]  # float32 rounding can leave the sum slightly off 1


def _from_first_points(first, n: int):
    """Ancestors [n] from `first[i]`, the index of the first of n sorted points at or
    past particle i's cdf value (n when none): point k takes the number of particles
    whose cdf value it has passed, #{i: first[i] <= k}. A histogram of `first` and its
    cumulative sum: O(N + n), where a binary search per point is O(n log N) and, on
    CPU, about 3x slower at N = 100,000."""
    slots = jnp.clip(first, 0, n).astype(jnp.int32)
    passed = jnp.cumsum(jnp.zeros(n + 1, jnp.int32).at[slots].add(1)[:n])
    return jnp.clip(passed, 0, first.shape[0] - 1).astype(jnp.int32)


def _invert_cdf(log_weights, u):
    """Indices i with cdf[i-1] <= u < cdf[i] for `u` in [0, 1), as int32."""
    w = _normalized(log_weights)
    cdf = jnp.cumsum(w)
    # Scale the points, not the CDF: float32 rounding can leave cdf[-1] slightly off 1.
    idx = jnp.searchsorted(cdf, u * cdf[-1], side="right")
    return jnp.clip(idx, 0, w.shape[0] - 1).astype(jnp.int32)
