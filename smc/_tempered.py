"""Adaptive tempered SMC for static models, standard and waste-free, one jit-compiled loop.

`tempered` moves N particles from the prior to the posterior of a `@ppl.gen` model
through the tempered targets

    pi_beta(x) ∝ p(x) L(x)^beta,   0 = beta_0 < beta_1 < ... < beta_K = 1,

where L(x) is everything that makes the model's likelihood: constrained choices
(`observations`), `obs=` sites, `ppl.factor` and `ppl.reward` terms. The tempered model
is the user's model under a `ppl.SiteHandler` that multiplies those sites' `scale` by
beta, so its traces answer the whole GFI and any `inference.Kernel` (MH, HMC, NUTS,
Gibbs, cycles of them) targets pi_beta when it runs on them. Each step picks the next
temperature by bisection so that the ESS of the incremental weights L(x)^(beta' - beta)
is `target_ess * N`, adds the log mean incremental weight to the log evidence, resamples
and rejuvenates with the kernel. The waste-free variant (Dau & Chopin 2022) resamples
M < N particles and keeps every state of M MCMC chains of length P = N / M.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

import inference
from inference._checks import check_constraint_values
from ppl import ArgumentError, ChoiceMap, GenerativeFunction, InferenceError, SiteHandler, Trace, handle
from ppl import particle_key
from ppl.extend import StepProgram, check_args, check_count, check_key, combine, is_concrete, partition, vmap_states

from ._filter import _vmap_shared
from ._resampling import get_resampler

__all__ = ["tempered", "TemperedResult"]

_WHERE = "smc.tempered"
_BISECTION_STEPS = 40  # brackets the temperature increment to 2^-40 of the remaining range
_TARGET_ACCEPT = 0.65  # HMC/NUTS step sizes are tuned towards this mean acceptance rate
_LOG_STEP_GAIN = 1.0  # log step size moves by gain * (mean acceptance - target) per step
_MAX_STEP_SIZE = 1.5  # leapfrog on a Gaussian preconditioned by its covariance is unstable from 2


@jax.tree_util.register_pytree_node_class
class TemperedResult:
    """The output of `tempered` with N particles and at most S = `max_steps` steps.

    Fields:
      log_marginal:  [] log of the evidence estimate: the sum over steps of
                     log (1/N) sum_i L(x_i)^(beta_k - beta_{k-1}), the particles x_i
                     equally weighted targets of pi_{beta_{k-1}}.
      log_weights:   [N] normalized log weights of `particles` (uniform: the run ends
                     with a resampling and a move).
      temperatures:  [S] beta_k reached at step k = 0..num_steps-1 (the last is 1.0);
                     entries from `num_steps` on repeat the last temperature.
      ess:           [S] ESS of step k's incremental weights (before resampling), in
                     [1, N]; about `target_ess * N` except at the last step.
      acceptance:    [S] the kernel's mean acceptance probability over the particles
                     and MCMC steps of step k (1 for kernels without a rejection).
      step_size:     [S] the HMC/NUTS step size used at step k (0 for other kernels).
      num_steps:     [] int32: the number of tempering steps K taken.
      degenerate_step: [] int32: the first step at which every particle had likelihood
                     zero (or NaN), -1 if none. Called eagerly, `tempered` raises instead.
      particles:     (property) the final particles, N traces of the model with the
                     observations: `particles["x"].shape == (N, ...)`.

    `result["x"]` is `result.particles["x"]`.
    """

    def __init__(self, packed, aux, log_marginal, temperatures, ess, acceptance, step_size, num_steps,
                 degenerate_step):
        self._packed = packed  # traces; leaves that no particle changes are stored once
        self._aux = aux  # per-leaf is_batched flags of _packed
        self.log_marginal = log_marginal
        self.temperatures = temperatures
        self.ess = ess
        self.acceptance = acceptance
        self.step_size = step_size
        self.num_steps = num_steps
        self.degenerate_step = degenerate_step

    @property
    def num_particles(self) -> int:
        leaves = [leaf for leaf, b in zip(jax.tree.leaves(self._packed), self._aux) if b]
        return leaves[0].shape[0]

    @property
    def log_weights(self) -> jax.Array:
        n = self.num_particles
        return jnp.full((n,), -math.log(n))

    @property
    def particles(self) -> Trace:
        """The final particles, a batch of N traces of the model (leaves [N, ...])."""
        n = self.num_particles
        leaves, treedef = jax.tree.flatten(self._packed)
        out = [leaf if b else jnp.broadcast_to(leaf, (n,) + jnp.shape(leaf)) for leaf, b in zip(leaves, self._aux)]
        return jax.tree.unflatten(treedef, out)

    def __getitem__(self, address):
        return self.particles[address]

    def __repr__(self):
        return (f"TemperedResult(num_particles={self.num_particles}, num_steps={self.num_steps}, "
                f"log_marginal={self.log_marginal})")

    def tree_flatten(self):
        children = (self._packed, self.log_marginal, self.temperatures, self.ess, self.acceptance,
                    self.step_size, self.num_steps, self.degenerate_step)
        return children, self._aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        packed, *rest = children
        return cls(packed, aux, *rest)


def tempered(
    key,
    model: GenerativeFunction,
    args: tuple,
    observations,
    num_particles: int,
    kernel: inference.Kernel | None = None,
    num_mcmc_steps: int | None = None,
    target_ess: float = 0.5,
    waste_free: bool | int = False,
    max_steps: int = 200,
    resampling="systematic",
    adapt_kernel: bool = True,
) -> TemperedResult:
    """Adaptive tempered SMC from the prior to the posterior of a static model.

    Signature: `tempered(key, model, args, observations, num_particles, kernel=None,
    num_mcmc_steps=None, target_ess=0.5, waste_free=False, max_steps=200,
    resampling="systematic", adapt_kernel=True)`.

    The targets are pi_beta(x) ∝ p(x) L(x)^beta, with L the likelihood: the density of
    the constrained choices (`observations`) and of `obs=` sites, times every factor and
    reward. Start: N draws from the prior (`model.generate` under the observations), at
    beta = 0. Step k, at temperature beta:

    1. beta' is the largest temperature <= 1 whose incremental log weights
       w_i = (beta' - beta) log L(x_i) have ESS = (sum e^w)^2 / sum e^2w >= target_ess * N
       (bisection; beta' = 1 when that already holds);
    2. log_marginal += logsumexp(w) - log N;
    3. standard: resample N particles by w (`resampling`), then apply the kernel
       `num_mcmc_steps` times to each, on the trace of the model tempered at beta';
       waste-free (`waste_free=M`): resample M particles and run each as a chain of
       P = N / M states (P - 1 kernel steps), every state kept: N particles again.

    The run stops when beta = 1 (the last step resamples and moves too, so the final
    particles are equally weighted draws targeting the posterior). The evidence
    estimate is consistent; in the standard variant it is unbiased on the natural
    scale for a fixed schedule (the adaptive schedule adds an O(1/N) bias).

    Kernel adaptation (`adapt_kernel=True`): before the moves of each step, every
    HMC/NUTS kernel (alone or inside `inference.cycle`) gets a diagonal inverse mass
    matrix equal to the weighted variance of the particles' unconstrained coordinates
    under the step's weights w (a dense covariance when the kernel has
    `dense_mass=True`), shrunk towards 1e-3 as Stan does, and a step size set from the
    previous step's mean acceptance a: log eps' = min(log eps + (a - 0.65), log 1.5),
    starting from eps = d^(-1/4) for d unconstrained dimensions (1.5: leapfrog on a
    Gaussian preconditioned by its covariance is unstable from eps = 2). The kernel's own step size and warmup
    settings are then not used. Other kernels (MH, Gibbs) run as given.

    Args:
      key: a `jax.random` key.
      model: a generative function (e.g. `@ppl.gen`) with a likelihood: observations,
        `obs=` sites, factors or rewards.
      args: the model's args tuple.
      observations: a choice map or dict of constrained addresses and values.
      num_particles: N, a static int >= 2.
      kernel: an `inference.Kernel` (default `inference.hmc(num_steps=10)`, on the
        unconstrained space). It must not move the observed addresses.
      num_mcmc_steps: kernel steps per tempering step in the standard variant (default
        10); not used by the waste-free variant, whose chains have length N / M.
      target_ess: the ESS fraction each step aims for, in (0, 1).
      waste_free: False (standard), True (M = N / 10 chains of length 10), or an int M,
        1 <= M < N dividing N.
      max_steps: S, a static bound on the number of tempering steps.
      resampling: "systematic", "stratified", "residual", "multinomial", or a function
        `(key, log_weights [N], n) -> ancestors [n]`.
      adapt_kernel: tune HMC/NUTS from the particle population (above).

    Returns a `TemperedResult`: log_marginal [], particles (N traces), log_weights [N],
    temperatures [S], ess [S], acceptance [S], step_size [S], num_steps [],
    degenerate_step []. Jittable and vmappable as a whole (the run is one
    `lax.while_loop`, kernels vmapped over particles).

    Errors: `ArgumentError` for a model without a likelihood site, `target_ess` outside
    (0, 1), a kernel that is not an `inference.Kernel`, a bad `waste_free`. Called eagerly,
    a run that does not reach beta = 1 within `max_steps`, or whose particles all have
    likelihood zero, raises `InferenceError`; under `jax.jit` check
    `temperatures[num_steps - 1]` and `degenerate_step`.

    >>> import numpyro.distributions as dist, ppl
    >>> @ppl.gen
    ... def model():
    ...     mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    ...     ppl.sample("y", dist.Normal(mu, 0.5).expand([5]).to_event(1))
    >>> res = tempered(jax.random.key(0), model, (), {"y": jnp.ones(5)}, 64, kernel=inference.mh("mu"),
    ...                num_mcmc_steps=2)
    >>> res.log_marginal.shape, res["mu"].shape, float(res.temperatures[res.num_steps - 1])
    ((), (64,), 1.0)
    """
    if not isinstance(model, GenerativeFunction):
        raise ArgumentError(f"{_WHERE}: the model must be a generative function (@ppl.gen), got "
                            f"{type(model).__name__}.")
    key = check_key(key, model, _WHERE)
    args = check_args(args, model, _WHERE)
    n = check_count(num_particles, "num_particles", _WHERE, 2)
    max_steps = check_count(max_steps, "max_steps", _WHERE, 1)
    target_ess = _check_target(target_ess)
    if kernel is None:
        kernel = inference.hmc(num_steps=10)
    if not isinstance(kernel, inference.Kernel):
        raise ArgumentError(
            f"{_WHERE}: kernel must be an inference.Kernel, e.g. inference.hmc(num_steps=10), inference.nuts() "
            f"or inference.mh('x'), got {type(kernel).__name__}.")
    num_chains = _check_waste_free(waste_free, n)
    if num_mcmc_steps is None:
        num_mcmc_steps = 10
    elif num_chains is not None:
        raise ArgumentError(
            f"{_WHERE}: num_mcmc_steps is not used by the waste-free variant (each of the M chains runs "
            f"N / M - 1 kernel steps); pass one of waste_free={waste_free!r} or num_mcmc_steps.")
    num_mcmc_steps = check_count(num_mcmc_steps, "num_mcmc_steps", _WHERE, 1)
    resampler = get_resampler(resampling, _WHERE)
    observations = ChoiceMap.of(observations)
    check_constraint_values(model, args, observations, _WHERE)
    observed, latent = _survey(model, args, observations)
    dynamic, static = partition(args)
    result = _tempered(
        key, dynamic, observations, static=static, model=model, n=n, kernel=kernel,
        num_mcmc_steps=num_mcmc_steps, target_ess=target_ess, num_chains=num_chains, max_steps=max_steps,
        resampler=resampler, observed=observed, latent=latent, adapt_kernel=bool(adapt_kernel),
    )
    _raise_if_failed(result, max_steps, model)
    return result


class _Temper(SiteHandler):
    """Scales the likelihood sites (constrained choices at `observed` paths, `obs=` sites,
    factors, rewards) by `beta` and the free latent sites by `prior` (1 for pi_beta, 0 for
    the log likelihood alone). Built inside the jitted run, so `beta` may be traced; the
    handled model never leaves the step that made it."""

    def __init__(self, beta, observed: frozenset, prior=1.0):
        self.beta = beta
        self.observed = observed
        self.prior = prior

    def process(self, site):
        if site.kind in ("observed", "factor", "reward") or (site.kind == "latent" and site.path in self.observed):
            return site._replace(scale=site.scale * self.beta)
        if site.kind == "latent" and self.prior is not None:
            return site._replace(scale=site.scale * self.prior)
        return site


class _Survey(SiteHandler):
    """Records the paths of likelihood sites (static facts only)."""

    def __init__(self, observed: frozenset):
        self.observed = observed
        self.likelihood = []

    def process(self, site):
        if site.kind in ("observed", "factor", "reward") or (site.kind == "latent" and site.path in self.observed):
            self.likelihood.append(site.path)
        return site


def _survey(model, args, observations: ChoiceMap) -> tuple[tuple, tuple]:
    """(observed paths, latent paths); a model without any likelihood site is refused."""
    observed = tuple(observations.addresses())
    survey = _Survey(frozenset(observed))
    dynamic, static = partition(args)
    trace = jax.eval_shape(
        lambda k, dyn, obs: handle(model, survey).generate(k, obs, combine(dyn, static))[0],
        jax.random.key(0), dynamic, observations)
    if not survey.likelihood:
        raise ArgumentError(
            f"{_WHERE}: {model.__name__} has no likelihood site to temper: no observations were given "
            "and it has no obs= site, factor or reward, so its posterior is its prior. Pass the observed "
            "values, e.g. smc.tempered(key, model, args, {'y': ys}, num_particles).")
    latent = tuple(a for a in trace.choices.addresses() if a not in set(observed))
    if not latent:
        raise ArgumentError(f"{_WHERE}: {model.__name__} has no latent random choice: every choice is observed.")
    return observed, latent


@functools.partial(jax.jit, static_argnames=(
    "static", "model", "n", "kernel", "num_mcmc_steps", "target_ess", "num_chains", "max_steps", "resampler",
    "observed", "latent", "adapt_kernel"))
def _tempered(key, dynamic, observations, *, static, model, n, kernel, num_mcmc_steps, target_ess, num_chains,
              max_steps, resampler, observed, latent, adapt_kernel):
    args = combine(dynamic, static)
    observed_set = frozenset(observed)
    log_likelihood_model = handle(model, _Temper(1.0, observed_set, prior=0.0))
    k_init, k_loop, k_final = jax.random.split(key, 3)

    def latents_of(trace):
        choices = trace.choices
        return ChoiceMap({a: choices[a] for a in latent})

    def log_likelihood(latents):
        lik = jax.vmap(lambda x: log_likelihood_model.assess(x.merge(observations), args)[0])(latents)
        return jnp.where(jnp.isnan(lik), -jnp.inf, lik)

    def init_particle(i):
        trace, log_weight = model.generate(particle_key(k_init, i), observations, args)
        return latents_of(trace), log_weight

    latents, lik = jax.vmap(init_particle)(jnp.arange(n, dtype=jnp.uint32))
    lik = jnp.where(jnp.isnan(lik), -jnp.inf, lik)

    shared = (dynamic, observations)

    def states_at(beta, latents):
        """The kernel's states at temperature beta, held as `(stepper, own)`: the model's
        arguments and observations once (`shared`), not once per particle."""
        tempered_model = handle(model, _Temper(beta, observed_set))

        def one(x, shared):
            dyn, obs = shared
            trace, _ = tempered_model.generate(k_init, x.merge(obs), combine(dyn, static))  # every choice given
            return kernel.init(trace, observed=observed, num_warmup=0)

        def step(k, state):
            state, info = kernel.step(k, state)
            return state, (info, latents_of(state.trace))

        layout, own = vmap_states(one, latents, shared)
        stepper = StepProgram(step, layout, k_init, own, shared)
        return stepper, stepper.adopt(own, n)

    def body(carry):
        k, beta, latents, lik, log_z, log_eps, records, dead = carry
        key_k = jax.random.fold_in(k_loop, k)
        k_resample, k_move = jax.random.split(key_k)
        new_beta = _next_temperature(beta, lik, target_ess * n)
        log_w = jnp.where(jnp.isneginf(lik), -jnp.inf, (new_beta - beta) * lik)
        log_z_k = logsumexp(log_w)
        is_dead = ~jnp.isfinite(log_z_k)
        log_w = jnp.where(is_dead, 0.0, log_w)  # a dead run goes on uniformly and stops below
        ess = jnp.exp(2.0 * logsumexp(log_w) - logsumexp(2.0 * log_w))
        stepper, own = states_at(new_beta, latents)
        layout = stepper.layout
        if adapt_kernel:
            states, eps = _adapt(layout.join(own, shared), log_w, log_eps)
            own = layout.split(states)
        else:
            eps = jnp.zeros(())
        if num_chains is None:
            ancestors = resampler(k_resample, log_w, n)
            own = layout.take(own, ancestors)
            own, acceptance, _ = _run_chains(stepper, k_move, own, shared, num_mcmc_steps)
            latents = latents_of(layout.join(own, shared).trace)
        else:
            ancestors = resampler(k_resample, log_w, num_chains)
            starts = layout.take(own, ancestors)
            own, acceptance, chain = _run_chains(stepper, k_move, starts, shared, n // num_chains - 1)
            latents = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]).reshape((n,) + a.shape[1:]),
                                   latents_of(layout.join(starts, shared).trace), chain)
        lik = log_likelihood(latents)
        log_eps = jnp.minimum(log_eps + _LOG_STEP_GAIN * (acceptance - _TARGET_ACCEPT), math.log(_MAX_STEP_SIZE))
        temperatures, ess_k, acc_k, eps_k = records
        records = (temperatures.at[k].set(new_beta), ess_k.at[k].set(ess), acc_k.at[k].set(acceptance),
                   eps_k.at[k].set(eps))
        dead = jnp.where((dead < 0) & is_dead, k, dead)
        return (k + 1, new_beta, latents, lik, log_z + log_z_k - math.log(n), log_eps, records, dead)

    def cond(carry):
        k, beta, *_, dead = carry
        return (beta < 1.0) & (k < max_steps) & (dead < 0)

    dim = sum(int(np.prod(jnp.shape(leaf)[1:])) for leaf in jax.tree.leaves(latents))
    zeros = jnp.zeros((max_steps,))
    carry = (jnp.zeros((), jnp.int32), jnp.zeros(()), latents, lik, jnp.zeros(()),
             jnp.asarray(-0.25 * math.log(max(dim, 1)), jnp.float32), (zeros, zeros, zeros, zeros),
             jnp.asarray(-1, jnp.int32))
    num_steps, beta, latents, _, log_z, _, records, dead = jax.lax.while_loop(cond, body, carry)
    temperatures, ess, acceptance, eps = records
    temperatures = jnp.where(jnp.arange(max_steps) < num_steps, temperatures, beta)
    log_z = jnp.where(dead >= 0, -jnp.inf, log_z)
    packed, is_batched = _vmap_shared(
        lambda i, x: model.generate(particle_key(k_final, i), x.merge(observations), args)[0],
        jnp.arange(n, dtype=jnp.uint32), latents)
    return TemperedResult(packed, is_batched, log_z, temperatures, ess, acceptance, eps, num_steps, dead)


def _next_temperature(beta, lik, target):
    """The largest beta' in (beta, 1] with ESS((beta' - beta) lik) >= target, by bisection."""

    def ess(delta):
        log_w = jnp.where(jnp.isneginf(lik), -jnp.inf, delta * lik)
        return jnp.exp(2.0 * logsumexp(log_w) - logsumexp(2.0 * log_w))

    room = 1.0 - beta

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = ess(mid) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, (jnp.zeros_like(room), room))
    # lo = 0 when even the smallest increment tried fails (particles with likelihood 0):
    # take that smallest increment, so the run moves on.
    delta = jnp.where(lo > 0, lo, hi)
    return jnp.where(ess(room) >= target, 1.0, jnp.minimum(beta + delta, 1.0))


def _run_chains(stepper, key, own, shared, num_steps):
    """`num_steps` kernel steps of a batch held as `stepper.layout` leaves: (own, mean
    acceptance, latents after each step `[num_steps, batch, ...]`)."""
    batch = next(leaf.shape[0] for leaf, u in zip(own, stepper.layout.uniform) if not u)

    def one(own, k):
        own, (info, latents) = stepper(jax.random.split(k, batch), own, shared)
        return own, (_acceptance(info), latents)

    own, (acceptance, recorded) = jax.lax.scan(one, own, jax.random.split(key, num_steps))
    return own, jnp.mean(acceptance), recorded


def _acceptance(info):
    """Mean acceptance probability of a batch of infos (1 for kernels that always accept)."""
    if hasattr(info, "accept_prob"):
        return jnp.mean(info.accept_prob)
    if isinstance(info, tuple) and not hasattr(info, "_fields"):
        return jnp.mean(jnp.stack([_acceptance(i) for i in info]))
    return jnp.ones(())


def _adapt(states, log_w, log_eps):
    """Set every HMC/NUTS state's step size to exp(log_eps) and its inverse mass matrix to
    the particles' weighted (co)variance on the real line. Returns (states, step size)."""
    eps = jnp.exp(log_eps)
    if isinstance(states, inference.HMCState):
        return _adapt_hmc(states, log_w, eps), eps
    if isinstance(states, inference.CycleState):
        subs = [_adapt(s, log_w, log_eps) for s in states.states]
        if any(isinstance(s, (inference.HMCState, inference.CycleState)) for s in states.states):
            return inference.CycleState(tuple(s for s, _ in subs)), eps
        return states, jnp.zeros(())
    return states, jnp.zeros(())


def _adapt_hmc(states, log_w, eps):
    n = log_w.shape[0]
    if isinstance(states.hmc.adapt_state.inverse_mass_matrix, dict):
        raise ArgumentError(
            f"{_WHERE}: the kernel has a block-structured mass matrix (dense_mass=[...]); smc.tempered sets "
            "the mass matrix from the particles' covariance: use dense_mass=True or False.")
    z = states.hmc.z  # [N, d]: without blocks, HMC holds the moved sites as one vector
    w = jax.nn.softmax(log_w)[:, None]
    mean = jnp.sum(w * z, axis=0)
    centred = z - mean
    adapt = states.hmc.adapt_state
    shrink = n / (n + 5.0)  # Stan's regularization towards 1e-3 * identity
    if jnp.ndim(adapt.inverse_mass_matrix) == 3:  # dense: [N, d, d]
        cov = jnp.einsum("ni,nj->ij", w * centred, centred)
        inv_mm = shrink * cov + (1 - shrink) * 1e-3 * jnp.eye(cov.shape[0])
        sqrt_inv = jnp.swapaxes(jnp.linalg.cholesky(inv_mm[::-1, ::-1])[::-1, ::-1], -2, -1)
        sqrt = jax.scipy.linalg.solve_triangular(sqrt_inv, jnp.eye(cov.shape[0]), lower=True)
    else:
        var = jnp.sum(w * centred**2, axis=0)
        inv_mm = shrink * var + (1 - shrink) * 1e-3
        sqrt_inv = jnp.sqrt(inv_mm)
        sqrt = 1.0 / sqrt_inv

    def per_particle(a):
        return jnp.broadcast_to(a, (n,) + jnp.shape(a))

    # The dual-averaging state is replaced by constants: warmup is off (num_warmup=0),
    # and its value would otherwise keep numpyro's initial step-size search alive.
    adapt = adapt._replace(
        step_size=jnp.broadcast_to(eps, (n,)).astype(adapt.step_size.dtype),
        inverse_mass_matrix=per_particle(inv_mm), mass_matrix_sqrt=per_particle(sqrt),
        mass_matrix_sqrt_inv=per_particle(sqrt_inv),
        ss_state=jax.tree.map(jnp.zeros_like, adapt.ss_state))
    return dataclasses.replace(states, hmc=states.hmc._replace(adapt_state=adapt))


# -- checks ----------------------------------------------------------------------------------


def _check_target(target_ess) -> float:
    try:
        value = float(target_ess)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ArgumentError(f"{_WHERE}: target_ess must be a number in (0, 1) known before the run, got "
                            f"{target_ess!r}.") from None
    if not 0.0 < value < 1.0:
        raise ArgumentError(
            f"{_WHERE}: target_ess must lie strictly between 0 and 1 (the fraction of N that each step's "
            f"ESS aims for; 0.5 is usual), got {target_ess!r}.")
    return value


def _check_waste_free(waste_free, n: int):
    """None (standard) or the number M of chains."""
    if waste_free is False or waste_free is None:
        return None
    if waste_free is True:
        if n % 10 or n < 20:
            raise ArgumentError(
                f"{_WHERE}: waste_free=True runs N / 10 chains of length 10, so num_particles must be a "
                f"multiple of 10 (at least 20), got {n}. Or pass the number of chains M, a divisor of N.")
        return n // 10
    ok = isinstance(waste_free, (int, np.integer)) and not isinstance(waste_free, bool)
    if not ok or not 1 <= waste_free < n or n % waste_free:
        raise ArgumentError(
            f"{_WHERE}: waste_free must be False, True, or the number M of resampled chains, an int with "
            f"1 <= M < N dividing N = {n} (each chain keeps N / M states), got {waste_free!r}.")
    return int(waste_free)


def _raise_if_failed(result: TemperedResult, max_steps: int, model) -> None:
    if not is_concrete(result.num_steps):
        return  # under a user's jit: the fields report it
    dead, k = int(result.degenerate_step), int(result.num_steps)
    if dead >= 0:
        raise InferenceError(
            f"{_WHERE}: at step {dead} every particle of {model.__name__} has likelihood zero (or NaN): no "
            "prior draw is possible under the observations. Check that the observations lie in their "
            "sites' supports and that the model's parameters are valid.")
    final = float(result.temperatures[k - 1])
    if final < 1.0:
        raise InferenceError(
            f"{_WHERE}: the temperature reached only {final:.4g} after max_steps={max_steps} steps. Raise "
            "max_steps, or lower target_ess (fewer, larger steps).")
