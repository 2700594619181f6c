"""Reparameterized rejection sampling (RSVI, Naesseth et al. 2017) for Gamma, Beta, Dirichlet.

A Gamma(a, 1) draw with a >= 1 comes from Marsaglia and Tsang's sampler: propose
`z = h(eps, a) = (a - 1/3) (1 + eps / sqrt(9a - 3))^3` with `eps ~ N(0, 1)` and accept
with probability `q(z) / (M r(z))`, where `q` is the Gamma density and `r` the
proposal's density of `z`. The accepted noise then has the density

    pi(eps; a) = s(eps) q(h(eps, a); a) / r(h(eps, a); a) = q(h(eps, a); a) |dh/deps (eps, a)|

(`s` the standard normal density, `r(h) = s(eps) / |dh/deps|`), so for any `f`

    E_q[f(z)] = E_pi[f(h(eps, a))]
    grad_a E_q[f(z)] = E_pi[grad_z f(h) grad_a h(eps, a)]           (g_rep, eps held fixed)
                     + E_pi[f(h(eps, a)) grad_a log pi(eps; a)]        (g_cor)

with `grad_a log pi = grad_a log(q(h(eps, a); a) / r(h(eps, a); a))` since `s` does not
depend on `a`. For Marsaglia-Tsang, `dh/deps = sqrt(a - 1/3) (1 + eps / sqrt(9a - 3))^2`,
so `log pi(eps; a) = (a - 1) log h - h - lgamma(a) + log(a - 1/3) / 2 + 2 log(1 + eps /
sqrt(9a - 3))`, differentiated in `a` at the accepted `eps`.

Shape augmentation (the paper's section 5): for shape `alpha` and `B >= 1` boosts,
`z = z' prod_{i=0}^{B-1} u_i^(1 / (alpha + i))` with `z' ~ Gamma(alpha + B, 1)` and
`u_i ~ U(0, 1)` is a Gamma(alpha, 1) draw. `z'` comes from the sampler above at
`a = alpha + B >= 1` (any alpha > 0), the `u_i` are reparameterized (their density does
not depend on alpha), and the correction is `f grad log pi(eps; alpha + B)`. A rate
`beta` divides the draw (`z / beta`, pathwise only: the accepted noise's density does
not depend on it). Beta(a1, a0) is `g1 / (g1 + g2)` and Dirichlet(alpha) is
`g / sum(g)` over independent unit-rate Gammas: the pathwise term goes through the
normalization and the correction sums over the Gammas.

How the correction reaches the estimate (`_grad.py`): the guide runs twice inside the
construct. The first run records each site's value `z`, its pathwise dependence on the
parameters intact. The second, with every choice given its first-run value, draws each
rsvi site's accepted noise `eps` again from the same site key (the same numbers) and
records it under its density `pi(eps; theta)` (`AcceptedNoise`), while the body goes
on with the first run's `z`: the site scores of that run are `log pi(eps; theta)`,
differentiable in the parameters through every upstream value, inside `ppl.vmap` and
`ppl.scan` alike. They join the score-function terms, multiplied by the objective.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import gammaln

import ppl
from ppl.extend import format_address, site_scores

from ._wrapped import Wrapped

__all__ = ["RSVI_FAMILIES", "GammaParts", "gamma_parts", "RSVISample", "AcceptedNoise", "log_noise_density",
           "noise_scores"]

RSVI_FAMILIES = "Gamma (and Chi2), Beta and Dirichlet"
sg = jax.lax.stop_gradient


class GammaParts(NamedTuple):
    """A site's draw as unit-rate Gammas: `family` 'gamma' | 'beta' | 'dirichlet',
    `concentration` of the Gammas (`[*S]` for gamma and dirichlet, `[*S, 2]` for beta,
    with S the site's value shape) and `rate` (`[*S]`, gamma only, else None)."""

    family: str
    concentration: jax.Array
    rate: jax.Array | None


def gamma_parts(d: dist.Distribution, path) -> GammaParts:
    """`d` (Gamma, Beta or Dirichlet, possibly expanded or made independent) as unit-rate
    Gammas, parameters broadcast to the site's value shape; an error naming the site and
    the supported families otherwise."""
    base = d
    while isinstance(base, (dist.Independent, dist.ExpandedDistribution)):
        base = base.base_dist
    shape = tuple(d.batch_shape) + tuple(d.event_shape)
    if isinstance(base, dist.Gamma):
        concentration, rate = jnp.broadcast_to(base.concentration, shape), jnp.broadcast_to(base.rate, shape)
        return GammaParts("gamma", concentration, rate)
    if isinstance(base, dist.Beta):
        c1, c0 = jnp.broadcast_to(base.concentration1, shape), jnp.broadcast_to(base.concentration0, shape)
        return GammaParts("beta", jnp.stack([c1, c0], axis=-1), None)
    if isinstance(base, dist.Dirichlet):
        return GammaParts("dirichlet", jnp.broadcast_to(base.concentration, shape), None)
    raise ppl.ArgumentError(
        f"vi.rsvi at {format_address(path)}: no rejection-sampler reparameterization for "
        f"{type(base).__name__}; vi.rsvi covers {RSVI_FAMILIES}. Use vi.reparam (any distribution "
        "with rsample) or vi.reinforce (any distribution) for this site."
    )


def _marsaglia_tsang(key, a):
    """Accepted proposal noise `eps` of Marsaglia and Tsang's Gamma(a, 1) sampler, `[*a.shape]`.

    Every element tries with fresh normals and uniforms until it accepts (probability
    above 0.95 per try for a >= 1). Elements with a < 1 or a non-finite `a` stop at once
    with `eps = nan`, so a bad parameter shows as a non-finite objective, not a hang.
    """
    a = sg(a)
    valid = jnp.isfinite(a) & (a >= 1.0)
    d = jnp.where(valid, a, 2.0) - 1.0 / 3.0
    c = jax.lax.rsqrt(9.0 * d)

    def body(state):
        i, eps, done = state
        k_normal, k_uniform = jax.random.split(jax.random.fold_in(key, i))
        e = jax.random.normal(k_normal, a.shape, a.dtype)
        u = jax.random.uniform(k_uniform, a.shape, a.dtype)
        v = (1.0 + c * e) ** 3
        log_v = jnp.log(jnp.where(v > 0, v, 1.0))
        accept = (v > 0) & (jnp.log(u) < 0.5 * e**2 + d - d * v + d * log_v)
        return i + 1, jnp.where(accept & ~done, e, eps), done | accept

    start = (jnp.zeros((), jnp.uint32), jnp.full(a.shape, jnp.nan, a.dtype), ~valid)
    return jax.lax.while_loop(lambda s: ~jnp.all(s[2]), body, start)[1]


def _noise(key, a, boost: int):
    """`(eps, log_u)`: the accepted noise `[*a.shape]` at `a` (not differentiated) and
    the boosts' `log u_i`, `[boost, *a.shape]`. One function for both runs, so the
    same site key gives the same numbers."""
    k_eps, k_u = jax.random.split(key)
    eps = _marsaglia_tsang(k_eps, a)
    u = jax.random.uniform(k_u, (boost,) + a.shape, a.dtype)
    return eps, jnp.log1p(-u)  # 1 - u is uniform on (0, 1]: log is finite


def _log_h(eps, a):
    """`log h(eps, a)`, the log of the Marsaglia-Tsang proposal, and `log(1 + c eps)`."""
    d = a - 1.0 / 3.0
    log_1p = jnp.log1p(eps * jax.lax.rsqrt(9.0 * d))
    return jnp.log(d) + 3.0 * log_1p, log_1p


def log_noise_density(eps, a):
    """`log pi(eps; a)`, elementwise: the density of the sampler's accepted noise, which
    is the Gamma(a, 1) density at `h(eps, a)` times `dh/deps`."""
    log_h, log_1p = _log_h(eps, a)
    log_gamma = (a - 1.0) * log_h - jnp.exp(log_h) - gammaln(a)
    return log_gamma + 0.5 * jnp.log(a - 1.0 / 3.0) + 2.0 * log_1p


class RSVISample(Wrapped):
    """`base` (a Gamma, Beta or Dirichlet site) drawn by the boosted Marsaglia-Tsang
    sampler, the draw a differentiable function of the parameters at fixed noise.
    Densities and support are `base`'s."""

    def __init__(self, base: dist.Distribution, parts: GammaParts, boost: int):
        super().__init__(base)
        self.parts, self.boost = parts, boost

    def sample(self, key, sample_shape=()):
        if sample_shape:
            raise ppl.ArgumentError("vi.rsvi draws one value per site (no sample_shape).")
        alpha = self.parts.concentration
        eps, log_u = _noise(key, alpha + self.boost, self.boost)
        log_g, _ = _log_h(eps, alpha + self.boost)
        steps = jnp.arange(self.boost, dtype=alpha.dtype).reshape((self.boost,) + (1,) * alpha.ndim)
        log_g = log_g + jnp.sum(log_u / (alpha + steps), axis=0)  # log Gamma(alpha, 1) draws
        info = jnp.finfo(alpha.dtype)
        if self.parts.family == "gamma":
            return jnp.maximum(jnp.exp(log_g - jnp.log(self.parts.rate)), info.tiny)
        x = jax.nn.softmax(log_g, axis=-1)
        if self.parts.family == "beta":
            x = x[..., 0]
        return jnp.clip(x, info.tiny, 1.0 - info.eps)


class AcceptedNoise(dist.Distribution):
    """The accepted proposal noise behind an rsvi site: `sample` repeats the draw of
    `RSVISample` under the same key and returns `eps` (`[*S]`, or `[*S, 2]` for a Beta
    site); `log_prob(eps)` is `log pi(eps; alpha + boost)` per unit-rate Gamma."""

    def __init__(self, parts: GammaParts, boost: int):
        self.parts, self.boost = parts, boost
        shape = parts.concentration.shape
        super().__init__(shape, (), validate_args=False)

    @property
    def support(self):
        return dist.constraints.real

    def sample(self, key, sample_shape=()):
        return _noise(key, self.parts.concentration + self.boost, self.boost)[0]

    def log_prob(self, value):
        return log_noise_density(value, self.parts.concentration + self.boost)


class _AcceptedNoiseSites(ppl.SiteHandler):
    """The second run of a construct with rsvi sites: every choice is given its first
    run's value; each drawn rsvi site instead draws its accepted noise again (same site
    key, same numbers) and records it under the noise's density, while the body goes on
    with the first run's value."""

    def __init__(self, paths: frozenset):
        self.paths = paths

    def process(self, site):
        estimator = getattr(site.fn, "estimator", None)  # a vi.Estimated wrapper
        if site.kind != "latent" or estimator is None:
            return site
        if estimator == "rsvi" and site.path in self.paths:
            noise = AcceptedNoise(gamma_parts(site.fn.base, site.path), site.fn.boost)
            value = site.value
            return site._replace(fn=noise, value=None, to_model=lambda _: value)
        return site._replace(fn=site.fn.base)


@functools.lru_cache(maxsize=256)
def _noise_handler(paths: frozenset) -> _AcceptedNoiseSites:
    return _AcceptedNoiseSites(paths)  # one instance per path set: jit caches hit


def noise_scores(gen_fn, key, trace, args, paths) -> dict:
    """rsvi path -> `log pi(eps; theta)` of its accepted noise (summed over stacked axes)."""
    handled = ppl.handle(gen_fn, _noise_handler(frozenset(paths)))
    noise_trace, _ = handled.generate(key, trace.choices, args)
    scores = site_scores(noise_trace)
    return {path: scores[path] for path in sorted(paths)}
