"""numpyro distributions as sites and as generative functions.

Density policy. numpyro masks every `log_prob` with `where(support(value), lp, -inf)`
over the broadcast value when validation is on, which costs about 4x on density-bound
work (a Normal log density over a (100000, 100) array: 38-45 ms masked, 7-10 ms
unmasked, on a 2-core CPU). The core evaluates densities unmasked and decides per
transformation:

- a value the distribution itself sampled is in its support: no mask;
- a value from the user (observation, constraint, `assess`, a kept value whose
  distribution changed under `update`/`regenerate`) gets one scalar mask,
  `where(all(support(value)), sum(lp), -inf)`. Observations are shared by all
  particles, so under `vmap` the support test runs once, not once per particle;
- a concrete value (known while tracing) is checked right away, and a bad one is an
  error naming the address instead of a silent -inf.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import Distribution

from ._choicemap import ChoiceMap
from ._errors import ArgumentError, ObservationError, format_address
from ._gfi import GenerativeFunction
from ._keys import draw
from ._trace import Trace

__all__ = ["distribution", "DistributionGF", "log_density", "prepare_value", "is_concrete"]


@contextlib.contextmanager
def _unmasked():
    """numpyro instances built with `validate_args=None` read this class flag at call time."""
    previous = Distribution._validate_args
    Distribution._validate_args = False
    try:
        yield
    finally:
        Distribution._validate_args = previous


# Densities of the commonest families in the (x - loc)^2 / scale^2 form. numpyro's
# ((x - loc) / scale)^2 form keeps one more [batch, data] residual for reverse mode:
# jax.grad of a regression log joint over 10,000 points ran 1.18x slower with it
# (benchmarks/core.py, grad_assess). Values are equal to float32 rounding (tested).
_LOG2 = float(np.log(2.0))
_FAST_LOG_PROB = {
    dist.Normal: lambda d, x: jax.scipy.stats.norm.logpdf(x, d.loc, d.scale),
    dist.HalfNormal: lambda d, x: jax.scipy.stats.norm.logpdf(x, 0.0, d.scale) + _LOG2,
}
_SUMMED_WRAPPERS = (dist.Independent, dist.ExpandedDistribution)


def log_density(d: Distribution, value, *, check_support: bool) -> jax.Array:
    """Scalar log density of `value` under `d` (summed over batch and event dims)."""
    base = d
    while type(base) in _SUMMED_WRAPPERS:  # both only reshape or broadcast a summed density
        base = base.base_dist
    fast = _FAST_LOG_PROB.get(type(base))
    if fast is not None:
        lp = jnp.sum(fast(base, value))
    else:
        with _unmasked():
            lp = jnp.sum(d.log_prob(value))
    if check_support:
        lp = jnp.where(in_support(d, value), lp, -jnp.inf)
    return lp


def in_support(d: Distribution, value) -> jax.Array:
    """Scalar bool: every element of `value` lies in the support of `d`."""
    try:
        support = d.support
    except NotImplementedError:
        return jnp.asarray(True)
    if support is None:
        return jnp.asarray(True)
    return jnp.all(support(value))


def is_concrete(x) -> bool:
    """True when `x` has a value at trace time (not an abstract tracer)."""
    return not isinstance(x, jax.core.Tracer)


def _concretely_in_support(d: Distribution, value) -> bool:
    """Evaluate the support test now, even while tracing; True when undecidable."""
    try:
        with jax.ensure_compile_time_eval():
            return bool(in_support(d, value))
    except jax.errors.ConcretizationTypeError:
        return True


def sample_struct(d: Distribution) -> jax.ShapeDtypeStruct:
    """Shape and dtype of `d.sample(key)`, found without sampling (for a distribution that
    cannot be sampled, `numpyro.distributions.ImproperUniform`, its shape as floats)."""
    try:
        return jax.eval_shape(d.sample, jax.random.key(0))
    except NotImplementedError:
        return jax.ShapeDtypeStruct(d.shape(), jnp.result_type(float))


def prepare_value(address, d: Distribution, value, what: str):
    """Check a user-supplied value for site `address` and cast it to the sample dtype.

    Returns `(value, ok)`: `ok` is None, or a traced bool that is False when a traced
    fractional value was given to a discrete site (its log density must then be -inf:
    casting would floor it). `what` names its origin in messages ("observation",
    "constraint", "choice"). Shape mismatches are errors always; non-finite, fractional
    (for a discrete site) or out-of-support values are errors when the value is concrete
    while tracing.
    """
    struct = sample_struct(d)
    try:
        value = jnp.asarray(value)
    except TypeError as e:
        raise ObservationError(
            f"{what} for site {format_address(address)} is not an array ({type(value).__name__}): {e}"
        ) from None
    if value.shape != struct.shape:
        raise ObservationError(
            f"{what} for site {format_address(address)} has shape {value.shape}, but the site "
            f"samples shape {struct.shape} ({type(d).__name__} with batch_shape "
            f"{d.batch_shape} and event_shape {d.event_shape}). Make the distribution's "
            f"shape match the data, e.g. dist.{type(d).__name__}(...).expand({value.shape}) "
            "or parameters that broadcast to it; use .to_event(n) for event dimensions."
        )
    if is_concrete(value):
        host = np.asarray(value)
        if np.issubdtype(host.dtype, np.inexact) and not np.all(np.isfinite(host)):
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(host))[0]) if host.ndim else ()
            where = f" at index {bad}" if host.ndim else ""
            raise ObservationError(
                f"{what} for site {format_address(address)} is not finite{where} "
                f"(value {host[bad]}). Remove or impute the "
                "missing entries, or mask them: dist.Normal(...).mask(is_observed)."
            )
        is_fractional = np.issubdtype(host.dtype, np.inexact) and not np.all(host == np.round(host))
        if jnp.issubdtype(struct.dtype, jnp.integer) and is_fractional:
            raise ObservationError(
                f"{what} for site {format_address(address)} has non-integer values, but "
                f"{type(d).__name__} is a discrete distribution over integers."
            )
        params_known = all(is_concrete(leaf) for leaf in jax.tree.leaves(d))
        if params_known and not _concretely_in_support(d, value):
            raise ObservationError(
                f"{what} for site {format_address(address)} lies outside the support of "
                f"{type(d).__name__} ({d.support}). Its log density would be -inf."
            )
        return value.astype(struct.dtype), None
    ok = None
    if jnp.issubdtype(struct.dtype, jnp.integer) and jnp.issubdtype(value.dtype, jnp.inexact):
        ok = jnp.all(value == jnp.round(value))
    return value.astype(struct.dtype), ok


# ----------------------------------------------------------------------------------------
# A distribution as a generative function
# ----------------------------------------------------------------------------------------


class DistributionGF(GenerativeFunction):
    """A numpyro distribution as a generative function with one choice at address `()`.

    `ppl.distribution(dist.Normal)` takes the constructor's parameters as its args;
    `ppl.distribution(dist.Normal(0.0, 1.0))` a fixed distribution and args `()`.

    >>> normal = distribution(dist.Normal)
    >>> tr = normal.simulate(jax.random.key(0), (0.0, 1.0))
    >>> bool(tr.score == dist.Normal(0.0, 1.0).log_prob(tr[()]))
    True
    """

    def __init__(self, family):
        self.family = family
        self.__name__ = getattr(family, "__name__", type(family).__name__)

    def __eq__(self, other):
        return isinstance(other, DistributionGF) and other.family is self.family

    def __hash__(self):
        return hash((DistributionGF, id(self.family)))

    def _dist(self, args) -> Distribution:
        if isinstance(self.family, Distribution):
            return self.family
        return self.family(*args)

    def _check_arity(self, args, method):
        if isinstance(self.family, Distribution) and args:
            raise ArgumentError(
                f"{self.__name__}.{method}: this distribution is fixed and takes args (), got {len(args)}."
            )

    def _trace(self, args, value, lp, site=None):
        retval = value if site is None or site.to_model is None else site.to_model(value)
        return Trace(self, args, retval, lp, value)

    def _site(self, args, method, value=None):
        """The choice as a site, through the installed site handlers."""
        from ._interpreter import current_path
        from ._site import Site, apply_handlers

        path = current_path()
        site = Site("latent", path[-1] if path else "", path, self._dist(args), (), value, 1.0, method)
        return apply_handlers(site)

    def _given(self, site, what):
        value, ok = prepare_value(site.path, site.fn, site.value, what)
        lp = log_density(site.fn, value, check_support=True)
        return value, site.scale * (lp if ok is None else jnp.where(ok, lp, -jnp.inf))

    def _draw(self, key, site):
        value = draw(site.fn, key)
        return value, site.scale * log_density(site.fn, value, check_support=False)

    def _simulate(self, key, args):
        site = self._site(args, "simulate")
        value, lp = self._given(site, "value") if site.value is not None else self._draw(key, site)
        return self._trace(args, value, lp, site)

    def _assess(self, choices, args):
        site = self._site(args, "assess", _leaf(choices, self, "assess"))
        value, lp = self._given(site, "choice")
        return lp, value if site.to_model is None else site.to_model(value)

    def _generate(self, key, constraints, args):
        given = None if constraints.is_empty else _leaf(constraints, self, "generate")
        site = self._site(args, "generate", given)
        if site.value is None:
            value, lp = self._draw(key, site)
            return self._trace(args, value, lp, site), jnp.zeros(())
        value, lp = self._given(site, "constraint")
        return self._trace(args, value, lp, site), lp

    def _update(self, key, trace, constraints, args):
        given = None if constraints.is_empty else _leaf(constraints, self, "update")
        site = self._site(args, "update", given)
        if site.value is None:
            value, discard = trace.inner, ChoiceMap()
            lp = site.scale * log_density(site.fn, value, check_support=True)
        else:
            value, lp = self._given(site, "constraint")
            discard = ChoiceMap.leaf(trace.inner)
        return self._trace(args, value, lp, site), lp - trace.score, discard

    def _regenerate(self, key, trace, selection, args):
        site = self._site(args, "regenerate")
        if () in selection:
            value, lp = self._draw(key, site)
            return self._trace(args, value, lp, site), jnp.zeros(())
        lp = site.scale * log_density(site.fn, trace.inner, check_support=True)
        return self._trace(args, trace.inner, lp, site), lp - trace.score

    def _project(self, trace, selection):
        return trace.score if () in selection else jnp.zeros(())

    def _choices(self, trace):
        return ChoiceMap.leaf(trace.inner)


def _leaf(choices: ChoiceMap, gf, method):
    if not choices.has_value:
        raise ArgumentError(
            f"{gf.__name__}.{method}: a distribution has one choice at address (); pass "
            "ChoiceMap.leaf(value)."
        )
    return choices[()]


def distribution(family) -> DistributionGF:
    """Wrap a numpyro distribution class (args = its parameters) or instance (args = ()).

    Any callable returning a distribution works as a family (a class, or a factory).
    """
    if isinstance(family, Distribution) or callable(family):
        return DistributionGF(family)
    raise ArgumentError(f"ppl.distribution expects a numpyro distribution or class, got {family!r}")


def is_distribution(x) -> bool:
    return isinstance(x, Distribution)


def is_distribution_class(x) -> bool:
    return isinstance(x, type) and issubclass(x, Distribution) and x is not dist.Distribution
