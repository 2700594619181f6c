"""Ready objectives, each an ordinary objective built from the vi constructs.

`elbo`, `iwae`, `renyi` and `vimco` return `objective(key, params) -> scalar`. The
guide is a generative function called with `(params, *model_args)`; its random choices
must cover the model's latent choices, and the model is scored at them with the
observations added (`model.assess`). None of them is special-cased by `vi.grad`: each
is a few lines over `vi.simulate` and `model.assess`, as a user's own objective would be.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints

import ppl
from ppl.extend import check_args, format_address

from ._grad import learning_signal, simulate

__all__ = ["elbo", "iwae", "renyi", "vimco", "log_weights"]


def _particles(n, where):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ppl.ArgumentError(f"{where}: num_particles must be a positive int, got {n!r}.")
    return int(n)


def _check_inputs(model, guide, model_args, where):
    for name, gf in (("model", model), ("guide", guide)):
        if not isinstance(gf, ppl.GenerativeFunction):
            raise ppl.ArgumentError(f"{where}: {name} must be a generative function (@ppl.gen), got {type(gf).__name__}.")
    if not isinstance(model_args, tuple):
        raise ppl.ArgumentError(f"{where}: model_args must be a tuple, got {type(model_args).__name__}.")


def log_weights(model, guide, model_args, observations, key, params, num_particles=None, where="vi"):
    """`(log w, guide trace)`: `log p(x, observations) - log q(x)` at guide draws `x`.

    With `num_particles=K`, `log w` is `[K]` and the trace a batch of K traces. The
    building block of the ready objectives; use it in your own.
    """
    obs = ppl.ChoiceMap.of(observations) if observations is not None else ppl.ChoiceMap()
    guide_args = (params,) + tuple(model_args)
    trace = simulate(guide, key, guide_args, num_particles=num_particles)
    _check_cover(model, guide, model_args, guide_args, obs, where)

    def log_p(choices):
        return model.assess(choices.merge(obs) if not obs.is_empty else choices, model_args)[0]

    if num_particles is None:
        lp = log_p(trace.choices)
    else:
        lp = jax.vmap(log_p)(trace.choices)
    return lp - trace.score, trace


# -- static checks: the guide covers the model's latent choices on their supports ---------


class _Supports(ppl.SiteHandler):
    """Records each latent site's support (a static fact)."""

    def __init__(self):
        self.supports = {}

    def process(self, site):
        if site.kind == "latent":
            d = site.fn
            self.supports[site.path] = getattr(d, "base", d).support
        return site


def _survey(gf, args, constraints_=None):
    """(choice addresses, {path: support}) of `gf` run abstractly."""
    h = _Supports()
    handled = ppl.handle(gf, h)
    box = []

    def run(key, a):
        if constraints_ is None:
            tr = handled.simulate(key, a)
        else:
            tr, _ = handled.generate(key, constraints_, a)
        box.append(tr.choices.addresses())
        return 0.0

    jax.eval_shape(lambda key: run(key, args), jax.random.key(0))  # args closed over: static ints stay static
    return set(box[0]), h.supports


_CHECKED: dict = {}


def _check_cover(model, guide, model_args, guide_args, obs, where):
    """Errors for a guide that misses a latent choice, samples an observed address, or
    has a support the model's does not contain. Run once per traced signature."""
    try:
        sig = (model, guide, jax.tree_util.tree_structure((model_args, guide_args, obs)),
               tuple(getattr(x, "shape", None) for x in jax.tree_util.tree_leaves((model_args, guide_args, obs))))
        hash(sig)
    except TypeError:
        sig = None
    if sig is not None and sig in _CHECKED:
        return
    model_choices, model_supports = _survey(model, model_args, obs if not obs.is_empty else None)
    guide_choices, guide_supports = _survey(guide, guide_args)
    observed = set(obs.addresses())
    sampled_observed = sorted(guide_choices & observed)
    if sampled_observed:
        raise ppl.AddressError(
            f"{where}: the guide samples {', '.join(format_address(a) for a in sampled_observed)}, which "
            "the observations fix. A guide proposes the latent choices only; drop those sites from it."
        )
    missing = sorted((model_choices - observed) - guide_choices)
    if missing:
        raise ppl.AddressError(
            f"{where}: the guide has no site for the model's latent choice(s) "
            f"{', '.join(format_address(a) for a in missing)}. Every latent choice needs a guide site "
            "at the same address (its value is scored under the model), or an observation."
        )
    for path, support in guide_supports.items():
        target = model_supports.get(path)
        if target is not None and not _contained(support, target):
            raise ppl.ArgumentError(
                f"{where}: the guide's site {format_address(path)} has support {support}, but the model's "
                f"has support {target}: the guide would draw values the model gives zero density. Use a "
                "guide distribution on the model's support (e.g. dist.LogNormal for a positive site, "
                "or dist.TransformedDistribution(d, numpyro.distributions.transforms.biject_to(support)))."
            )
    if sig is not None:
        _CHECKED[sig] = True


def _kind(c):
    return type(c.base_constraint if isinstance(c, constraints.independent) else c)


def _contained(inner, outer) -> bool:
    """Whether support `inner` lies inside `outer` (conservatively: False if unsure)."""
    ki, ko = _kind(inner), _kind(outer)
    real = (type(constraints.real),)
    if ko in real or ki is ko:
        return True
    positive = type(constraints.positive)
    nonneg = type(constraints.nonnegative)
    unit = type(constraints.unit_interval)
    if ko is nonneg and ki in (positive, unit):
        return True
    if ko in (positive, type(constraints.interval(0.0, 1.0))) and ki is unit:
        return True
    return False


# -- the objectives ------------------------------------------------------------------------


def elbo(model, guide, model_args: tuple, observations, num_particles: int = 1):
    """The evidence lower bound `E_q[log p(x, y) - log q(x)]`, averaged over
    `num_particles` independent guide draws.

    >>> import jax, numpyro.distributions as dist, ppl, vi
    >>> @ppl.gen
    ... def model():
    ...     z = ppl.sample("z", dist.Normal(0.0, 1.0))
    ...     return ppl.sample("y", dist.Normal(z, 1.0))
    >>> @ppl.gen
    ... def guide(params):                  # the exact posterior N(y / 2, 1 / 2)
    ...     return ppl.sample("z", dist.Normal(params, 0.5 ** 0.5))
    >>> objective = vi.elbo(model, guide, (), {"y": 1.0})
    >>> value, _ = vi.grad(objective)(jax.random.key(0), 0.5)
    >>> round(float(value), 4)              # log N(1; 0, 2), whatever the draw
    -1.5155
    """
    _check_inputs(model, guide, model_args, "vi.elbo")
    k = _particles(num_particles, "vi.elbo")

    def objective(key, params):
        lw, _ = log_weights(model, guide, model_args, observations, key, params,
                            None if k == 1 else k, "vi.elbo")
        return jnp.mean(lw)

    return objective


def iwae(model, guide, model_args: tuple, observations, num_particles: int):
    """The importance-weighted bound `E[log (1/K) sum_k w_k]`, `w_k = p(x_k, y) / q(x_k)`
    (Burda et al. 2016). K = 1 is the ELBO; it increases with K toward log p(y)."""
    _check_inputs(model, guide, model_args, "vi.iwae")
    k = _particles(num_particles, "vi.iwae")

    def objective(key, params):
        lw, _ = log_weights(model, guide, model_args, observations, key, params, k, "vi.iwae")
        return logsumexp(lw) - math.log(k)

    return objective


def renyi(model, guide, model_args: tuple, observations, num_particles: int, alpha: float):
    """The variational Renyi bound `1/(1-alpha) E[log (1/K) sum_k w_k^(1-alpha)]` (Li and
    Turner 2016): alpha = 0 is the IWAE bound, alpha -> 1 the ELBO; alpha < 0 gives an
    upper-bound-like objective, still estimated with the same K draws."""
    _check_inputs(model, guide, model_args, "vi.renyi")
    k = _particles(num_particles, "vi.renyi")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ppl.ArgumentError(f"vi.renyi: alpha must be a number, got {alpha!r}.")
    alpha = float(alpha)

    def objective(key, params):
        lw, _ = log_weights(model, guide, model_args, observations, key, params, k, "vi.renyi")
        if alpha == 1.0:
            return jnp.mean(lw)
        return (logsumexp((1.0 - alpha) * lw) - math.log(k)) / (1.0 - alpha)

    return objective


def vimco(model, guide, model_args: tuple, observations, num_particles: int):
    """The IWAE bound with VIMCO's per-particle learning signals (Mnih and Rezende 2016)
    for the guide's score-function (reinforce) sites.

    Particle k's signal is `L - L_{-k}`, where `L_{-k}` replaces `log w_k` in the bound
    by the mean of the other particles' log weights: a baseline independent of particle
    k's draw, so the estimate stays unbiased. Needs K >= 2.
    """
    _check_inputs(model, guide, model_args, "vi.vimco")
    k = _particles(num_particles, "vi.vimco")
    if k < 2:
        raise ppl.ArgumentError("vi.vimco: num_particles must be at least 2 (the baseline uses the other particles).")

    def objective(key, params):
        lw, trace = log_weights(model, guide, model_args, observations, key, params, k, "vi.vimco")
        bound = logsumexp(lw) - math.log(k)
        others = (jnp.sum(lw) - lw) / (k - 1)  # mean of the other log weights, [K]
        swapped = lw[None, :] * (1 - jnp.eye(k)) + jnp.diag(others)  # row k: log w_k -> others_k
        loo = logsumexp(swapped, axis=1) - math.log(k)
        learning_signal(trace, bound - loo)
        return bound

    return objective
