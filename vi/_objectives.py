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
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints

import ppl
from ppl.extend import check_count, format_address

from ._grad import learning_signal, simulate
from ._guides import survey

sg = jax.lax.stop_gradient

__all__ = ["elbo", "iwae", "renyi", "vimco", "rws", "sivi", "log_weights"]


def _check_inputs(model, guide, model_args, where):
    for name, gf in (("model", model), ("guide", guide)):
        if not isinstance(gf, ppl.GenerativeFunction):
            raise ppl.ArgumentError(f"{where}: {name} must be a generative function (@ppl.gen), got {type(gf).__name__}.")
    if not isinstance(model_args, tuple):
        raise ppl.ArgumentError(f"{where}: model_args must be a tuple, got {type(model_args).__name__}.")


def log_weights(model, guide, model_args, observations, key, params, num_particles=None, where="vi",
                learn_model=False):
    """`(log w, guide trace)`: `log p(x, observations) - log q(x)` at guide draws `x`.

    With `num_particles=K`, `log w` is `[K]` and the trace a batch of K traces. The
    building block of the ready objectives; use it in your own. With `learn_model=True`,
    `params` is a pair `(model_params, guide_params)` and the model is called with
    `(model_params, *model_args)` (a VAE's decoder, say), the guide with
    `(guide_params, *model_args)`.
    """
    obs = ppl.ChoiceMap.of(observations) if observations is not None else ppl.ChoiceMap()
    if learn_model:
        if not (isinstance(params, (tuple, list)) and len(params) == 2):
            raise ppl.ArgumentError(
                f"{where}: with learn_model=True, params is a pair (model_params, guide_params); "
                f"got {type(params).__name__}."
            )
        model_params, params = params
        model_args = (model_params,) + tuple(model_args)
    guide_args = (params,) + tuple(model_args[1:] if learn_model else model_args)
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
    model_sites, guide_sites = survey(model, model_args, obs), survey(guide, guide_args)
    model_choices, guide_choices = set(model_sites), set(guide_sites)
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
    for path, (_, support) in guide_sites.items():
        target = model_sites[path][1] if path in model_sites else None
        if support is not None and target is not None and not _contained(support, target):
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


def elbo(model, guide, model_args: tuple, observations, num_particles: int = 1, *, learn_model: bool = False):
    """The evidence lower bound `E_q[log p(x, y) - log q(x)]`, averaged over
    `num_particles` independent guide draws. With `learn_model=True` the model has
    parameters too: `params = (model_params, guide_params)`, the model called with
    `(model_params, *model_args)` (see `log_weights`); every ready objective takes it.

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
    k = check_count(num_particles, "num_particles", "vi.elbo")

    def objective(key, params):
        lw, _ = log_weights(model, guide, model_args, observations, key, params,
                            None if k == 1 else k, "vi.elbo", learn_model)
        return jnp.mean(lw)

    return objective


def iwae(model, guide, model_args: tuple, observations, num_particles: int, *, learn_model: bool = False):
    """The importance-weighted bound `E[log (1/K) sum_k w_k]`, `w_k = p(x_k, y) / q(x_k)`
    (Burda et al. 2016). K = 1 is the ELBO; it increases with K toward log p(y)."""
    _check_inputs(model, guide, model_args, "vi.iwae")
    k = check_count(num_particles, "num_particles", "vi.iwae")

    def objective(key, params):
        lw, _ = log_weights(model, guide, model_args, observations, key, params, k, "vi.iwae", learn_model)
        return logsumexp(lw) - math.log(k)

    return objective


def renyi(model, guide, model_args: tuple, observations, num_particles: int, alpha: float, *,
          learn_model: bool = False):
    """The variational Renyi bound `1/(1-alpha) E[log (1/K) sum_k w_k^(1-alpha)]` (Li and
    Turner 2016): alpha = 0 is the IWAE bound, alpha -> 1 the ELBO; alpha < 0 gives an
    upper-bound-like objective, still estimated with the same K draws."""
    _check_inputs(model, guide, model_args, "vi.renyi")
    k = check_count(num_particles, "num_particles", "vi.renyi")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ppl.ArgumentError(f"vi.renyi: alpha must be a number, got {alpha!r}.")
    alpha = float(alpha)

    def objective(key, params):
        lw, _ = log_weights(model, guide, model_args, observations, key, params, k, "vi.renyi", learn_model)
        if alpha == 1.0:
            return jnp.mean(lw)
        return (logsumexp((1.0 - alpha) * lw) - math.log(k)) / (1.0 - alpha)

    return objective


def vimco(model, guide, model_args: tuple, observations, num_particles: int, *, learn_model: bool = False):
    """The IWAE bound with VIMCO's per-particle learning signals (Mnih and Rezende 2016)
    for the guide's score-function (reinforce) sites.

    Particle k's signal is `L - L_{-k}`, where `L_{-k}` replaces `log w_k` in the bound
    by the mean of the other particles' log weights: a baseline independent of particle
    k's draw, so the estimate stays unbiased. Needs K >= 2.
    """
    _check_inputs(model, guide, model_args, "vi.vimco")
    k = check_count(num_particles, "num_particles", "vi.vimco")
    if k < 2:
        raise ppl.ArgumentError("vi.vimco: num_particles must be at least 2 (the baseline uses the other particles).")

    def objective(key, params):
        lw, trace = log_weights(model, guide, model_args, observations, key, params, k, "vi.vimco", learn_model)
        bound = logsumexp(lw) - math.log(k)
        others = (jnp.sum(lw) - lw) / (k - 1)  # mean of the other log weights, [K]
        swapped = lw[None, :] * (1 - jnp.eye(k)) + jnp.diag(others)  # row k: log w_k -> others_k
        loo = logsumexp(swapped, axis=1) - math.log(k)
        learning_signal(trace, bound - loo)
        return bound

    return objective


def rws(model, guide, model_args: tuple, observations, num_particles: int, *, learn_model: bool = True):
    """Reweighted wake-sleep (Bornschein and Bengio 2015), wake-theta and wake-phi in one.

    With K guide draws `x_k` taken as data (`detach=True`) and self-normalized weights
    `wbar_k` of `w_k = p(x_k, y) / q(x_k)`: the model's parameters follow the gradient
    of the IWAE bound, `sum_k wbar_k grad log p(x_k, y)` (wake-theta), and the guide's
    follow `sum_k wbar_k grad log q(x_k)` (wake-phi, which fits q to the posterior in
    KL(p || q)). The objective's value is the IWAE estimate. Unlike the other
    objectives, its gradient is this update, not the gradient of its value: wake-phi is
    consistent in K but biased for finite K, as in the paper. `params` is
    `(model_params, guide_params)` (`learn_model=True`), or the guide's alone.
    """
    _check_inputs(model, guide, model_args, "vi.rws")
    k = check_count(num_particles, "num_particles", "vi.rws")
    obs = ppl.ChoiceMap.of(observations) if observations is not None else ppl.ChoiceMap()

    def objective(key, params):
        if learn_model:
            if not (isinstance(params, (tuple, list)) and len(params) == 2):
                raise ppl.ArgumentError("vi.rws: with learn_model=True, params is a pair (model_params, guide_params).")
            model_params, guide_params = params
            m_args = (model_params,) + tuple(model_args)
        else:
            guide_params, m_args = params, tuple(model_args)
        g_args = (guide_params,) + tuple(model_args)
        trace = simulate(guide, key, g_args, num_particles=k, detach=True)
        _check_cover(model, guide, m_args, g_args, obs, "vi.rws")
        choices = trace.choices
        lp = jax.vmap(lambda c: model.assess(c.merge(obs) if not obs.is_empty else c, m_args)[0])(choices)
        lq = jax.vmap(lambda c: guide.assess(c, g_args)[0])(choices)
        wbar = jax.nn.softmax(sg(lp - lq))
        bound = logsumexp(lp - sg(lq)) - math.log(k)  # wake-theta: gradient in the model's params only
        wake_phi = jnp.sum(wbar * lq)
        return bound + wake_phi - sg(wake_phi)

    return objective


def sivi(model, mixing, conditional, model_args: tuple, observations, num_inner: int, *,
         learn_model: bool = False):
    """Semi-implicit VI (Yin and Zhou 2018): a hierarchical guide `q(x) = int q(x | psi)
    q(psi) dpsi` whose marginal density is estimated by an inner importance sampler.

    `mixing(params, *model_args)` draws `psi` (its return value); `conditional(params,
    psi, *model_args)` draws the model's latent choices. With `psi_0` the draw behind
    `x` and `psi_1..psi_M` fresh draws, `log q(x)` is estimated by
    `log (1/(M+1)) sum_m q(x | psi_m)`; `log p(x, y)` minus it is a lower bound on the
    ELBO of the marginal guide (in expectation), tight as M grows. Its gradient is
    unbiased for that bound, through whatever estimators the two guides' sites carry.
    """
    for name, gf in (("mixing", mixing), ("conditional", conditional)):
        if not isinstance(gf, ppl.GenerativeFunction):
            raise ppl.ArgumentError(f"vi.sivi: {name} must be a generative function, got {type(gf).__name__}.")
    _check_inputs(model, conditional, model_args, "vi.sivi")
    m = check_count(num_inner, "num_particles", "vi.sivi")
    obs = ppl.ChoiceMap.of(observations) if observations is not None else ppl.ChoiceMap()

    def objective(key, params):
        if learn_model:
            model_params, params = params
            m_args = (model_params,) + tuple(model_args)
        else:
            m_args = tuple(model_args)
        k0, k1, k2 = jax.random.split(key, 3)
        psi0 = simulate(mixing, k0, (params,) + tuple(model_args)).retval
        c_args = (params, psi0) + tuple(model_args)
        trace = simulate(conditional, k1, c_args)
        _check_cover(model, conditional, m_args, c_args, obs, "vi.sivi")
        psis = simulate(mixing, k2, (params,) + tuple(model_args), num_particles=m).retval
        inner = jax.vmap(lambda psi: conditional.assess(trace.choices, (params, psi) + tuple(model_args))[0])(psis)
        log_q = logsumexp(jnp.concatenate([trace.score[None], inner])) - math.log(m + 1)
        choices = trace.choices.merge(obs) if not obs.is_empty else trace.choices
        return model.assess(choices, m_args)[0] - log_q

    return objective
