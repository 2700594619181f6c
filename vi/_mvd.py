"""The measure-valued derivative (`vi.mvd`): re-runs with one coordinate moved, and its
surrogate term.

For a guide site `x` with scalar-event coordinates `x_j` (the site's batch entries, its
particles, and the steps of the `ppl.vmap` / `ppl.scan` it sits in, flattened in C
order), the objective's derivative through the distribution of `x_j` is

    sum_k  d/dtheta q_j(k | before_j)  E[f | before_j, x_j = k]

(finite support; a weak-derivative decomposition for Poisson and geometric), where
`before_j` is everything the program drew before `x_j` and `q_j` is the coordinate's
conditional pmf. `mvd_terms` estimates each inner expectation by re-running the
objective with the same key and `x_j` moved, and adds `sum_j sum_k q_j(k) f_jk` as a
zero-valued surrogate whose gradient is the term.

A re-run must draw what comes after `x_j` from its conditional given the moved value,
and must not change what came before. Inside `ppl.scan` the later steps of the same
site depend on `x_j`, so freezing them at their old values would bias the estimate (the
old values were drawn given the old `x_j`). The re-run therefore gives the site a
continuation (`Continuation`): coordinates before `j` in C order keep their values,
`x_j` takes the moved value, coordinates after `j` are drawn afresh under the site's own
key. C order is enough because the core stacks combinator axes first, outermost first:
a coordinate that can depend on `x_j` lies in a later step of a scan that contains
`x_j`, so it agrees with `j` on the axes outside that scan and is larger on the scan's
axis, hence later in C order; the coordinates before `j` are earlier steps, or
independent of `x_j` (another particle, another `ppl.vmap` element, another batch entry
of the same draw). The freshly drawn coordinates use keys that the draws before `j` did
not use, so given `before_j` and the moved value they are exact draws from the guide's
conditional: each re-run's value is an unbiased estimate of `E[f | before_j, x_j = k]`,
and the common key only correlates the re-runs (common random numbers, lower variance).

`q_j(k | before_j)` is read, differentiably, from a scoring run of the guide at the
first run's values (`score_run`): the site's distribution is replaced by `Score`, whose
density at each step is the surrogate piece `sum_k q_j(k) w_jk` with the re-runs' values
`w` passed in per coordinate (a trace carries one scalar score per site and step, so the
per-coordinate probabilities are summed there, where the step's distribution is known).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

import ppl
from ppl.extend import site_scores

from ._estimators import Estimated, SiteInfo
from ._wrapped import Wrapped

__all__ = ["Continuation", "Score", "mvd_terms"]

sg = jax.lax.stop_gradient

# Continuation modes, one per coordinate (slot 1 of a continuation array).
FREE, GIVEN, GEOMETRIC_TAIL = 0.0, 1.0, 2.0


class Continuation(Wrapped):
    """A re-run's view of an mvd site: `base` with some coordinates given.

    `packed[..., 0]` is a value, `packed[..., 1]` a mode per coordinate: FREE (draw from
    `base`, under the site key, as the first run did), GIVEN (take the value), or
    GEOMETRIC_TAIL (the value plus an independent Geometric draw from `base`'s own `p`,
    by inversion of the uniform `packed[..., 2]`). Densities are `base`'s, so the re-run's
    trace is an ordinary trace of the guide.
    """

    def __init__(self, base: dist.Distribution, packed):
        super().__init__(base)
        self.packed = packed

    def sample(self, key, sample_shape=()):
        drawn = self.base.sample(key, sample_shape)  # first: NotImplementedError reaches the core
        value, mode, u = self.packed[..., 0], self.packed[..., 1], self.packed[..., 2]
        moved = value
        if _is_geometric(self.base):
            start = value.astype(drawn.dtype)
            log1m_p = sg(self.base.log_prob(start + 1) - self.base.log_prob(start))  # log(1 - p)
            tail = jnp.floor(jnp.log(u) / jnp.minimum(log1m_p, -jnp.finfo(u.dtype).tiny))
            moved = jnp.where(mode == GEOMETRIC_TAIL, value + tail, value)
        return jnp.where(mode == FREE, drawn, moved.astype(drawn.dtype))


class Score(Wrapped):
    """The scoring run's view of an mvd site: `log_prob(x)` is, per coordinate, the
    surrogate piece whose gradient is the measure-valued derivative term.

    `weights[..., :]` hold the re-runs' objective values (no gradient) per coordinate:
    bernoulli / categorical: `sum_k q(k) w_k` (one weight per support value);
    poisson: `rate * w` with `w = f(x + 1) - f(x)`; geometric: `p * (w / p)` with
    `w = f(x) - f(x + X' + 1)`, the second factor held fixed. The rate and `p` are read
    from `base`'s density ratio `q(x + 1) / q(x)`, so they are differentiable.
    """

    def __init__(self, base: dist.Distribution, weights, info: SiteInfo):
        super().__init__(base)
        self.weights = weights
        self.info = info

    def log_prob(self, value):
        info, w = self.info, self.weights
        if info.family in ("bernoulli", "categorical"):
            shape = jnp.shape(value)
            lps = jnp.stack([self.base.log_prob(jnp.full(shape, info.low + k, value.dtype)) for k in range(info.size)])
            q = jax.nn.softmax(lps, axis=0)  # the coordinate's pmf, differentiable
            return jnp.sum(q * jnp.moveaxis(w, -1, 0), axis=0)
        ratio = jnp.exp(self.base.log_prob(value + 1) - self.base.log_prob(value))
        if info.family == "poisson":
            return (value + 1) * ratio * w[..., 0]  # (x + 1) q(x + 1) / q(x) = rate
        p = -jnp.expm1(jnp.log(ratio))  # geometric: q(x + 1) / q(x) = 1 - p
        return p * sg(w[..., 0] / p)


def _is_geometric(d) -> bool:
    while isinstance(d, (dist.Independent, dist.ExpandedDistribution)):
        d = d.base_dist
    return isinstance(d, (dist.GeometricProbs, dist.GeometricLogits))


class _ScoreSite(ppl.SiteHandler):
    """The scoring run: every site given its first run's value, estimator wrappers
    removed; the mvd site at `path` is scored by `Score` with the weights that ride in
    the last axis of its given value (so `ppl.scan` hands each step its own)."""

    def __init__(self, path: tuple, info: SiteInfo):
        self.path, self.info = path, info

    def process(self, site):
        if site.kind != "latent":
            return site
        d = site.fn.base if isinstance(site.fn, Estimated) else site.fn
        if site.path != self.path:
            return site._replace(fn=d)
        packed = site.value
        return site._replace(fn=Score(d, packed[..., 1:], self.info), value=packed[..., 0])


@functools.lru_cache(maxsize=256)
def _score_handler(path: tuple, info: SiteInfo) -> _ScoreSite:
    return _ScoreSite(path, info)  # one instance per site: jit caches hit


def score_run(call, trace, path: tuple, info: SiteInfo, packed) -> jax.Array:
    """Sum over the coordinates of the site at `path` of the surrogate pieces of `Score`:
    the guide of construct `call = (gen_fn, key, args, num_particles)` run again with
    every choice of `trace` given, `packed` (`[*shape, 1 + W]`, value then weights) at
    `path`."""
    gen_fn, key, args, num_particles = call
    handled = ppl.handle(gen_fn, _score_handler(path, info))
    given = trace.choices.merge(ppl.ChoiceMap({path: packed}))
    if num_particles is None:
        scored, _ = handled.generate(key, given, args)
    else:
        one = lambda i, g: handled.generate(ppl.particle_key(key, i), g, args)[0]  # noqa: E731
        scored = jax.vmap(one)(jnp.arange(num_particles), given)
    return jnp.sum(site_scores(scored)[path])


def free_after(n: int) -> jax.Array:
    """`[n, n]` bool: row j marks the coordinates a re-run moving coordinate j draws
    afresh (those after j in C order; see the module docstring)."""
    index = jnp.arange(n)
    return index[None, :] > index[:, None]


def mvd_terms(rerun, key, base_tape, f0, sites) -> jax.Array:
    """Sum of the zero-valued surrogate terms of the mvd `sites` (value 0).

    `rerun(site_key, packed)` runs the objective with the site `site_key = (construct
    index, path)` continued by `packed` (`[*shape, 3]`, see `Continuation`) and returns
    its value; `base_tape` is the first run's tape, `f0` its value.
    """
    total = jnp.zeros(())
    for site_key, (info, shape) in sites.items():
        index, path = site_key
        value = base_tape.values[site_key]
        flat = jnp.ravel(value).astype(jnp.result_type(float))
        n = flat.size
        if n == 0:
            continue
        free = free_after(n)
        eye = jnp.eye(n, dtype=bool)

        def continued(moved, mode, u):
            """Row j: coordinate j set to `moved[j]` with `mode[j]`; before j kept."""
            values = jnp.where(eye, moved[:, None], flat[None, :])
            modes = jnp.where(eye, mode[:, None], jnp.where(free, FREE, GIVEN))
            us = jnp.where(eye, u[:, None], 0.5)
            return jnp.stack([values, modes, us], axis=-1).reshape((n,) + tuple(shape.shape) + (3,))

        run = jax.vmap(lambda p: sg(rerun(site_key, p)))
        ones, half = jnp.ones(n), jnp.full(n, 0.5)
        if info.family in ("bernoulli", "categorical"):
            ks = jnp.arange(info.size, dtype=flat.dtype) + info.low
            f_k = jax.vmap(lambda k: run(continued(jnp.full(n, k), ones * GIVEN, half)))(ks)  # [K, n]
            weights = f_k.T
        elif info.family == "poisson":
            weights = (run(continued(flat + 1, ones * GIVEN, half)) - sg(f0))[:, None]
        else:  # geometric: d/dp E f(X) = (E f(X) - E f(X + X' + 1)) / p, X' ~ Geometric(p)
            u = jax.random.uniform(jax.random.fold_in(key, 0x6D7664), (n,), minval=1e-7, maxval=1.0)
            weights = (sg(f0) - run(continued(flat + 1, ones * GEOMETRIC_TAIL, u)))[:, None]
        packed = jnp.concatenate([flat[:, None], weights], axis=-1)
        packed = packed.reshape(tuple(shape.shape) + (weights.shape[-1] + 1,))
        term = score_run(base_tape.calls[index], base_tape.traces[index], path, info, packed)
        total = total + term - sg(term)
    return total
