"""Checking concrete observations against their sites before an inference run is jitted.

Inside the jitted run the constraints are traced, so the core can only give a bad value
a log density of -inf. Called outside `jit`, an inference entry point first surveys the
model's latent sites (one abstract trace per model signature, cached) with a recording
`ppl.SiteHandler`, then checks each concrete constraint on the host: a non-finite value,
a fractional value for a discrete site, or a value outside a support that does not
depend on parameters, is an `ObservationError` naming the address.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import numpyro.distributions as dist
from numpyro.distributions.constraints import Constraint
from numpyro.distributions.transforms import biject_to

import ppl
from ppl.extend import combine, format_address, partition

__all__ = ["check_constraint_values", "IMPROPER_START"]


class _ImproperStart(ppl.SiteHandler):
    """Lets an improper site (`ImproperUniform`, which has no sampler) be drawn, from a
    placeholder `t(u)`, `u ~ Uniform(-2, 2)` on the real line (numpyro's uniform start):
    for surveys that only need shapes, and for MCMC starts that replace the value."""

    def process(self, site):
        if site.kind != "latent" or site.value is not None or not isinstance(site.fn, dist.ImproperUniform):
            return site
        t = biject_to(site.fn.support)
        shape = t.inverse_shape(site.fn.shape())
        base = dist.Uniform(-2.0, 2.0).expand(shape).to_event(len(shape))
        return site._replace(fn=dist.TransformedDistribution(base, t))


IMPROPER_START = _ImproperStart()


class _Survey(ppl.SiteHandler):
    """Records, per latent path, the sample dtype and the support when it is static."""

    def __init__(self):
        self.sites: dict = {}

    def process(self, site):
        if site.kind == "latent":
            d = site.fn
            dtype = jnp.result_type(float) if isinstance(d, dist.ImproperUniform) else (
                jax.eval_shape(d.sample, jax.random.key(0)).dtype
            )
            support = d.support if _is_static(d.support) else None
            self.sites[site.path] = (dtype, support)
            return IMPROPER_START.process(site)
        return site


def _is_static(constraint) -> bool:
    """True when the constraint holds no traced parameter (e.g. `positive`, `simplex`)."""
    for v in getattr(constraint, "__dict__", {}).values():
        if isinstance(v, jax.core.Tracer) or (isinstance(v, Constraint) and not _is_static(v)):
            return False
    return True


_SURVEYS: dict = {}


def _survey(model, args, constraints) -> dict:
    dynamic, static = partition(args)
    signature = (model, static, jax.tree.structure(constraints),
                 tuple((jnp.shape(x), str(jnp.result_type(x))) for x in jax.tree.leaves((dynamic, constraints))))
    if signature not in _SURVEYS:
        survey = _Survey()
        handled = ppl.handle(model, survey)
        jax.eval_shape(  # the key made while tracing: no eager op to compile
            lambda dyn, cons: handled.generate(jax.random.key(0), cons, combine(dyn, static)),
            dynamic, constraints,
        )
        _SURVEYS[signature] = survey.sites
    return _SURVEYS[signature]


def check_constraint_values(model, args: tuple, constraints: ppl.ChoiceMap, where: str) -> None:
    """Raise `ObservationError` for a concrete constraint its site cannot take."""
    items = [(a, v) for a, v in constraints.flat_items() if not isinstance(v, jax.core.Tracer)]
    if not items:
        return
    sites = _survey(model, args, constraints)
    for address, value in items:
        dtype, support = sites.get(address, (None, None))
        host = np.asarray(value)
        if np.issubdtype(host.dtype, np.inexact) and not np.all(np.isfinite(host)):
            raise ppl.ObservationError(
                f"{where}: constraint {format_address(address)} has non-finite values. "
                "Remove or impute them, or mask the missing entries in the model."
            )
        if dtype is not None and jnp.issubdtype(dtype, jnp.integer) and np.issubdtype(host.dtype, np.inexact):
            if not np.all(host == np.round(host)):
                raise ppl.ObservationError(
                    f"{where}: constraint for site {format_address(address)} has non-integer values, "
                    "but the site's distribution is over integers."
                )
        if support is None:
            continue
        # numpyro's constraints are operator expressions: on a host array of the dtype JAX
        # would hold, they run in numpy and compile nothing (one small XLA program per
        # check and shape otherwise, 0.1 s at a run's first call)
        inside = support(host.astype(jax.dtypes.canonicalize_dtype(host.dtype)))
        if isinstance(inside, (bool, np.bool_, np.ndarray)):
            inside = bool(np.all(inside))
        else:
            with jax.ensure_compile_time_eval():  # also when called inside a user's jit
                inside = bool(jnp.all(inside))
        if not inside:
            raise ppl.ObservationError(
                f"{where}: constraint for site {format_address(address)} lies outside the support "
                f"of its distribution ({support}); its log density would be -inf."
            )
