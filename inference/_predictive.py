"""Posterior and prior predictive draws: the model run forward, vmapped over draws."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

import ppl
from ppl.extend import check_args, check_key, combine, partition

from ._samples import Samples, user_key

__all__ = ["predictive"]


def predictive(key, model: ppl.GenerativeFunction, args: tuple, samples=None, num_samples: int | None = None) -> dict:
    """The model run forward at each draw of `samples`, or from the prior.

    With `samples` (a `Samples`, or a dict address -> array with leading axes
    `[chains, draws]`): for each draw, `model.generate(key_i, latent_i, args)` with the
    draw's random choices as constraints. Latent choices of the model that the draws do
    not hold are drawn from the prior given the rest, so choices that were
    observations during inference (given as constraints) are re-sampled: the posterior
    predictive. Sites observed with `obs=` keep their value (they are part of the
    model). Entries of `samples` that are not random choices (deterministic sites) are
    ignored and recomputed.

    With `samples=None` and `num_samples=n`: the prior predictive, `model.simulate`
    `n` times.

    Returns a dict `{name: array}` for every random choice, `obs=` site and
    deterministic site (names: 'y', or ('sub', 'z') below a nested call), with leading
    axes `[chains, draws]` (or `[n]`).

    >>> import numpyro.distributions as dist
    >>> @ppl.gen
    ... def model():
    ...     mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    ...     ppl.deterministic("twice", 2 * mu)
    ...     return ppl.sample("y", dist.Normal(mu, 1.0))
    >>> prior = inference.predictive(jax.random.key(0), model, (), num_samples=5)
    >>> prior["y"].shape, prior["twice"].shape
    ((5,), (5,))
    >>> post = inference.predictive(jax.random.key(1), model, (), {"mu": jnp.zeros((2, 3))})
    >>> post["y"].shape, bool(jnp.all(post["mu"] == 0.0))
    ((2, 3), True)
    """
    where = "inference.predictive"
    if not isinstance(model, ppl.GenerativeFunction):
        raise ppl.ArgumentError(
            f"{where}: model must be a generative function (decorate it with @ppl.gen), got {type(model).__name__}."
        )
    key = check_key(key, model, where)
    args = check_args(args, model, where)
    dynamic, static = partition(args)
    if samples is None:
        if not isinstance(num_samples, (int, np.integer)) or isinstance(num_samples, bool) or num_samples < 1:
            raise ppl.ArgumentError(
                f"{where}: give samples (posterior predictive) or num_samples=n >= 1 (prior predictive), "
                f"got num_samples={num_samples!r}."
            )
        sites = _site_paths(model, args)
        out = _prior(key, dynamic, static=static, model=model, num_samples=int(num_samples), sites=sites)
        return {user_key(p): v for p, v in zip(sites, out)}
    if num_samples is not None:
        raise ppl.ArgumentError(f"{where}: give samples or num_samples, not both.")
    draws = _draws(samples, where)
    lead = jnp.shape(next(iter(draws.values())))[:2]
    for path, value in draws.items():
        if jnp.shape(value)[:2] != lead:
            raise ppl.ArgumentError(
                f"{where}: samples[{path!r}] has leading axes {jnp.shape(value)[:2]}, expected {lead} "
                "([chains, draws]) like the other sites."
            )
    sites = _site_paths(model, args)
    choices = set(jax.eval_shape(lambda d: model.simulate(jax.random.key(0), combine(d, static)), dynamic)
                  .choices.addresses())
    given = {p: jnp.reshape(v, (-1,) + jnp.shape(v)[2:]) for p, v in draws.items() if p in choices}
    if not given:
        raise ppl.ArgumentError(
            f"{where}: none of the sites in samples ({', '.join(map(repr, draws))}) is a random choice "
            f"of {model.__name__}."
        )
    out = _posterior(key, dynamic, ppl.ChoiceMap(given), static=static, model=model, sites=sites)
    return {user_key(p): jnp.reshape(v, tuple(lead) + jnp.shape(v)[1:]) for p, v in zip(sites, out)}


def _draws(samples, where: str) -> dict:
    if isinstance(samples, Samples):
        return {p: samples[p] for p in samples.addresses}
    if isinstance(samples, Mapping):
        out = {}
        for name, value in samples.items():
            path = (name,) if isinstance(name, str) else tuple(name)
            if jnp.ndim(value) < 2:
                raise ppl.ArgumentError(
                    f"{where}: samples[{name!r}] has shape {jnp.shape(value)}; draws need leading axes "
                    "[chains, draws] (add a chain axis with x[None] for one chain)."
                )
            out[path] = value
        if out:
            return out
    raise ppl.ArgumentError(
        f"{where}: samples must be a Samples or a non-empty dict address -> [chains, draws, ...] array, "
        f"got {type(samples).__name__}."
    )


class _Survey(ppl.SiteHandler):
    def __init__(self):
        self.paths = []

    def process(self, site):
        if site.kind in ("observed", "deterministic"):
            self.paths.append(site.path)
        return site


def _site_paths(model, args) -> tuple:
    """Tuple paths of every random choice, obs= site and deterministic site."""
    dynamic, static = partition(args)
    survey = _Survey()
    trace = jax.eval_shape(
        lambda d: ppl.handle(model, survey).simulate(jax.random.key(0), combine(d, static)), dynamic
    )
    return tuple(trace.choices.addresses()) + tuple(dict.fromkeys(survey.paths))


def _read(trace, sites):
    return tuple(trace[p] for p in sites)


@functools.partial(jax.jit, static_argnames=("static", "model", "num_samples", "sites"))
def _prior(key, dynamic, *, static, model, num_samples, sites):
    args = combine(dynamic, static)
    return jax.vmap(lambda i: _read(model.simulate(ppl.particle_key(key, i), args), sites))(
        jnp.arange(num_samples, dtype=jnp.uint32)
    )


@functools.partial(jax.jit, static_argnames=("static", "model", "sites"))
def _posterior(key, dynamic, given, *, static, model, sites):
    args = combine(dynamic, static)
    n = jax.tree.leaves(given)[0].shape[0]

    def one(i, draw):
        trace, _ = model.generate(ppl.particle_key(key, i), draw, args)
        return _read(trace, sites)

    return jax.vmap(one)(jnp.arange(n, dtype=jnp.uint32), given)
