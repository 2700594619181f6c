"""Per-site gradient estimators: wrappers of a guide site's distribution.

`reparam(d)`, `reinforce(d, baseline=None)`, `enum(d)`, `mvd(d)` and `rsvi(d)` return
`d` wrapped in an `Estimated` distribution that records which estimator the site asks for. Outside
`vi.grad` the wrapper behaves exactly as `d` (same draws, same densities), so a guide
written for VI also runs under `simulate`, importance sampling or MCMC. Inside the vi
constructs (`vi.simulate`, `vi.generate`) a site handler unwraps it, tells the active
gradient estimate what the site needs, and hands the core the plain distribution:

- reparam:    the draw stays a differentiable function of the parameters (numpyro's
              `rsample` path; Gamma, Beta and Dirichlet by implicit reparameterization).
- reinforce:  the draw is cut from the gradient, and the site's log density joins the
              score-function term `(f - b) * grad log q(x)`; the baseline `b` is 0, a
              constant, the leave-one-out mean of independent copies, or a moving
              average of the objective over past optimization steps.
- enum:       the site's value is summed over its finite support, jointly with the other
              enumerated sites (re-running the objective once per joint value).
- mvd:        the measure-valued derivative, one coordinate at a time (re-running the
              objective with that coordinate moved), for Bernoulli, categorical, Poisson
              and geometric sites.
- rsvi:       reparameterized rejection sampling (Gamma, Beta, Dirichlet): the pathwise
              term through the accepted Marsaglia-Tsang proposal at fixed noise, plus the
              score-function correction for the acceptance step (`_rsvi.py`).

An unwrapped site is reparam when its distribution has `rsample`, else reinforce.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpyro.distributions as dist
from numpyro.distributions import constraints

import ppl
from ppl.extend import format_address, is_concrete

from ._rsvi import RSVISample, gamma_parts
from ._wrapped import Wrapped

__all__ = ["reparam", "reinforce", "enum", "mvd", "rsvi", "Estimated", "SiteInfo", "ESTIMATORS", "site_info"]

ESTIMATORS = ("reparam", "reinforce", "enum", "mvd", "rsvi")
BASELINES = ("leave_one_out", "moving_average")
# Largest number of joint values `enum` sums over in one gradient estimate.
MAX_ENUMERATION = 4096


class Estimated(Wrapped):
    """A distribution `base` that carries a gradient estimator name (and options).

    Sampling, densities, support and shapes are `base`'s; the vi constructs read
    `estimator` and its options: `baseline` and `decay` (reinforce), `boost` (rsvi).
    """

    def __init__(self, base: dist.Distribution, estimator: str, baseline=None, *, decay=None, boost=None):
        if not isinstance(base, dist.Distribution):
            raise ppl.ArgumentError(
                f"vi.{estimator} wraps a numpyro distribution, got {type(base).__name__}."
            )
        if isinstance(base, Estimated):
            raise ppl.ArgumentError(
                f"vi.{estimator}: the distribution already carries the estimator "
                f"vi.{base.estimator}; a site takes one estimator."
            )
        super().__init__(base)
        self.estimator = estimator
        self.baseline = baseline
        self.decay = decay
        self.boost = boost

    @property
    def has_rsample(self):
        return self.base.has_rsample

    @property
    def has_enumerate_support(self):
        return self.base.has_enumerate_support

    def enumerate_support(self, expand=True):
        return self.base.enumerate_support(expand)

    @property
    def mean(self):
        return self.base.mean

    @property
    def variance(self):
        return self.base.variance

    def __repr__(self):
        return f"vi.{self.estimator}({self.base!r})"


def reparam(d: dist.Distribution) -> Estimated:
    """Pathwise gradient: the draw is a differentiable function of `d`'s parameters.

    Needs `d.has_rsample` (Normal, LogNormal, Gamma, Beta, Dirichlet, transformed
    distributions of those, ...); a discrete `d` is refused by name when the guide runs.
    """
    return Estimated(d, "reparam")


def reinforce(d: dist.Distribution, baseline=None, *, decay: float = 0.9) -> Estimated:
    """Score-function gradient `(f - b) * grad log q(x)`, for any distribution.

    `baseline` (b), each leaving the estimate unbiased since b does not depend on this
    site's draw:

    - None: 0.
    - a Python number: a constant.
    - `"leave_one_out"`: the mean objective of the other independent copies that
      `vi.grad(objective, num_samples=K)` runs (needs K >= 2).
    - `"moving_average"`: an exponential moving average of the objective's value over
      the past optimization steps, `m_t = decay * m_{t-1} + (1 - decay) * f_{t-1}`,
      debiased as `m_t / (1 - decay^t)` (0 before the first step). The average is state
      carried from step to step by `vi.fit` (or `vi.stateful_grad`); a plain `vi.grad`
      call has no past steps and uses 0.
    """
    if baseline is not None and baseline not in BASELINES:
        if isinstance(baseline, str) or not is_concrete(baseline) or jax.numpy.ndim(baseline) != 0:
            raise ppl.ArgumentError(
                "vi.reinforce: baseline must be None, a number, 'leave_one_out' or 'moving_average'; "
                f"got {baseline!r}."
            )
        baseline = float(baseline)
    if baseline == "moving_average":
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ppl.ArgumentError(f"vi.reinforce: decay must be a number in (0, 1), got {decay!r}.")
        return Estimated(d, "reinforce", baseline, decay=float(decay))
    return Estimated(d, "reinforce", baseline)


def enum(d: dist.Distribution) -> Estimated:
    """Exact sum over `d`'s finite support (Bernoulli, Categorical, Binomial, ...).

    The objective is re-run once per joint value of all enumerated sites (at most
    4096 joint values per estimate); its expectation over these sites is then exact.
    """
    return Estimated(d, "enum")


def mvd(d: dist.Distribution) -> Estimated:
    """Measure-valued derivative, coordinate by coordinate (Bernoulli, Categorical,
    Poisson, Geometric).

    For each scalar coordinate of the site the objective is re-run with that coordinate
    moved: to every value of a finite support (Bernoulli, categorical), to x + 1
    (Poisson: d/d rate E f(X) = E[f(X + 1) - f(X)]), or to x + 1 and x + X' + 1 with X'
    an independent copy (geometric: d/dp E f(X) = (E f(X) - E f(X + X' + 1)) / p).
    Unbiased with lower variance than reinforce, at one re-run per coordinate and value.
    Works inside `ppl.vmap` and `ppl.scan`: a re-run keeps what was drawn before the
    moved coordinate and draws what comes after it (the later steps of a scan included)
    again given the moved value, so each re-run is a valid continuation (`vi/_mvd.py`).
    """
    return Estimated(d, "mvd")


def rsvi(d: dist.Distribution, boost: int = 1) -> Estimated:
    """Reparameterized rejection sampling (Naesseth et al. 2017) for Gamma, Beta and
    Dirichlet sites (Beta and Dirichlet through their unit-rate Gammas).

    The draw is Marsaglia and Tsang's accepted proposal `h(eps, a)` at the shape boosted
    to `a = alpha + boost`, times `prod_i u_i^(1/(alpha + i))` (i < boost), divided by
    the rate: a differentiable function of the parameters at fixed noise (the pathwise
    term). The acceptance step adds the score-function correction
    `f * grad log pi(eps; a)`, where `pi(eps; a) = q(h(eps, a); a) |dh/deps|` is the
    density of the accepted noise (derivation in `vi/_rsvi.py`). Unbiased; larger
    `boost` (an int >= 1) makes acceptance likelier and the correction smaller. Works
    inside `ppl.vmap` and `ppl.scan`; each estimate runs the guide a second time to
    score the accepted noise. `vi.reparam` on the same families is numpyro's implicit
    reparameterization, also unbiased.

    The site's value has `d`'s shape (`batch_shape + event_shape`); `d` may be expanded
    or made independent (`.expand(...)`, `.to_event(...)`).

    >>> import jax, numpyro.distributions as dist, ppl, vi
    >>> @ppl.gen
    ... def guide(shape):
    ...     return ppl.sample("z", vi.rsvi(dist.Gamma(shape, 2.0)))
    >>> objective = lambda key, shape: vi.simulate(guide, key, (shape,))["z"]  # E z = shape / 2
    >>> value, g = vi.grad(objective, num_samples=2000)(jax.random.key(0), 0.5)
    >>> bool(abs(g - 0.5) < 0.06)     # d/dshape = 1/2, within 5 standard errors (0.011)
    True
    """
    if isinstance(boost, bool) or not isinstance(boost, int) or boost < 1:
        raise ppl.ArgumentError(
            f"vi.rsvi: boost must be an int >= 1 (Marsaglia-Tsang needs a shape >= 1), got {boost!r}."
        )
    return Estimated(d, "rsvi", boost=boost)


class SiteInfo(NamedTuple):
    """What a gradient estimate needs to know about one guide site (static)."""

    estimator: str
    baseline: Any = None
    family: str = ""  # mvd: bernoulli | categorical | poisson | geometric
    low: int = 0  # enum / finite mvd: values low .. low + size - 1
    size: int = 0
    decay: float = 0.0  # reinforce with baseline="moving_average"
    boost: int = 0  # rsvi


def _finite_support(d: dist.Distribution, path, estimator: str):
    """(low, size) of a finite integer support with a concrete range, else an error."""
    support = d.support
    base = support.base_constraint if isinstance(support, constraints.independent) else support
    if base is constraints.boolean:
        return 0, 2
    if isinstance(base, constraints.integer_interval):
        low, high = base.lower_bound, base.upper_bound
        if is_concrete(low) and is_concrete(high) and jax.numpy.ndim(low) == 0 and jax.numpy.ndim(high) == 0:
            return int(low), int(high) - int(low) + 1
        # categorical: the upper bound is num_categories - 1, held as a per-row array
        if is_concrete(low) and is_concrete(high):
            lo, hi = jax.numpy.min(low), jax.numpy.max(high)
            if bool(jax.numpy.all(low == lo)) and bool(jax.numpy.all(high == hi)):
                return int(lo), int(hi) - int(lo) + 1
    raise ppl.ArgumentError(
        f"vi.{estimator} at {format_address(path)}: {type(d).__name__} has support {support}, "
        f"which is not a finite set of integers with a fixed range. Use vi.reinforce"
        + (" or vi.mvd" if estimator == "enum" else "")
        + " for this site."
    )


def _mvd_family(d: dist.Distribution, path) -> str:
    base = d
    while isinstance(base, (dist.Independent, dist.ExpandedDistribution)):
        base = base.base_dist
    if isinstance(base, (dist.BernoulliProbs, dist.BernoulliLogits)):
        return "bernoulli"
    if isinstance(base, (dist.CategoricalProbs, dist.CategoricalLogits)):
        return "categorical"
    if isinstance(base, dist.Poisson) and not isinstance(base, dist.ZeroInflatedPoisson):
        return "poisson"
    if isinstance(base, (dist.GeometricProbs, dist.GeometricLogits)):
        return "geometric"
    raise ppl.ArgumentError(
        f"vi.mvd at {format_address(path)}: no measure-valued derivative for {type(base).__name__}; "
        "vi.mvd covers Bernoulli, Categorical, Poisson and Geometric. Use vi.reinforce (any "
        "distribution) or vi.enum (finite support) for this site."
    )


def site_info(site: ppl.Site) -> tuple[dist.Distribution, SiteInfo]:
    """The plain distribution to hand the core, and the site's estimator (static).

    Raises the errors a user can fix: reparam on a distribution without `rsample`, enum
    on an infinite support, mvd or rsvi on an unsupported family.
    """
    d = site.fn
    if isinstance(d, Estimated):
        wrapped, d = d, d.base
        estimator, baseline = wrapped.estimator, wrapped.baseline
    else:
        wrapped, estimator, baseline = None, ("reparam" if d.has_rsample else "reinforce"), None
    if estimator == "reparam":
        if not d.has_rsample:
            kind = "discrete" if d.support.is_discrete else "not reparameterizable"
            raise ppl.ArgumentError(
                f"vi.reparam at {format_address(site.path)}: {type(d).__name__} is {kind} (no rsample), "
                "so its draw has no pathwise gradient. Wrap it in vi.reinforce (any distribution), "
                "vi.enum (finite support), vi.mvd (Bernoulli, Categorical, Poisson, Geometric) "
                "or vi.rsvi (Gamma, Beta, Dirichlet)."
            )
        return d, SiteInfo("reparam")
    if estimator == "reinforce":
        decay = wrapped.decay if wrapped is not None and wrapped.decay is not None else 0.0
        drawn = d if d.support.is_discrete else _StopGradient(d)
        return drawn, SiteInfo("reinforce", baseline, decay=decay)
    if estimator == "rsvi":
        return RSVISample(d, gamma_parts(d, site.path), wrapped.boost), SiteInfo("rsvi", boost=wrapped.boost)
    if d.event_shape != ():
        raise ppl.ArgumentError(
            f"vi.{estimator} at {format_address(site.path)}: the site has event shape {d.event_shape}; "
            f"vi.{estimator} handles distributions with scalar events (batch shapes are fine)."
        )
    if estimator == "enum":
        low, size = _finite_support(d, site.path, "enum")
        return d, SiteInfo("enum", low=low, size=size)
    family = _mvd_family(d, site.path)
    low, size = _finite_support(d, site.path, "mvd") if family in ("bernoulli", "categorical") else (0, 0)
    return d, SiteInfo("mvd", family=family, low=low, size=size)


class _StopGradient(Wrapped):
    """`base` whose draws carry no gradient (a continuous site under reinforce)."""

    def sample(self, key, sample_shape=()):
        return jax.lax.stop_gradient(self.base.sample(key, sample_shape))
