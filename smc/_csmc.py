"""Conditional SMC: a particle filter with one particle clamped to a reference trajectory.

`csmc` runs the particle filter of `particle_filter` over the steps of a `ppl.scan`
model (`ScanGF.step` under `ppl.particle_key`, one jit-compiled `lax.scan` over steps,
particles vmapped) with particle 0 held at a given reference trajectory at every step,
and returns one trajectory drawn from the final weights (Andrieu, Doucet & Holenstein,
"Particle Markov chain Monte Carlo methods", JRSS B 2010). The map reference ->
new trajectory leaves the smoothing distribution p(x_{1:T} | y_{1:T}) invariant for any
number of particles N >= 2: it is the state update of particle Gibbs
(`particle_gibbs`). With `ancestor_sampling=True` the reference's ancestor is redrawn
at each step from w_{t-1}^i p(x_t^ref, y_t | x_{t-1}^i) (Lindsten, Jordan & Schön,
"Particle Gibbs with ancestor sampling", JMLR 2014), which breaks the reference's
lineage and lets the early states move even with few particles.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from inference._checks import check_constraint_values
from ppl import (ArgumentError, ChoiceMap, GenerativeFunction, InferenceError, ObservationError, ScanGF, Trace,
                 particle_key, select)
from ppl.extend import check_args, check_key, combine, format_address, is_concrete, partition

from ._filter import ParticleFilterResult, _lineage, _strong
from ._resampling import multinomial

__all__ = ["csmc", "CSMCResult"]

_WHERE = "smc.csmc"


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["trajectory", "index", "filter", "carry_mismatch_step"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class CSMCResult:
    """The output of `csmc` over T steps with N particles.

    Fields:
      trajectory:          the new trajectory, a trace of the scan model (choices
                           [T, ...], observations included): the path of final particle
                           `index` traced back through the genealogy.
      index:               [] int32, the final particle drawn from the final weights.
      filter:              the conditional run as a `ParticleFilterResult`:
                           log_weights [N], ancestors [T, N] (particle 0 is the
                           reference at every step: ancestors[t, 0] is 0 without
                           ancestor sampling), ess [T], step_log_weights [T, N],
                           `paths()` (choices [N, T, ...]), and `log_marginal`, the
                           conditional filter's estimate of log p(y) (not unbiased: the
                           reference biases it).
      carry_mismatch_step: [] int32, -1 unless ancestor sampling met a kernel whose new
                           carry depends on the previous carry beyond the step's own
                           choices (then the ancestor weights would be wrong; see `csmc`):
                           the first such step. Called eagerly, `csmc` raises instead.
    """

    trajectory: Trace
    index: jax.Array
    filter: ParticleFilterResult
    carry_mismatch_step: jax.Array

    @property
    def log_weights(self) -> jax.Array:
        """[N] normalized log weights of the final particles."""
        return self.filter.log_weights

    @property
    def ancestors(self) -> jax.Array:
        """[T, N] the genealogy (see `ParticleFilterResult.ancestors`)."""
        return self.filter.ancestors

    @property
    def log_marginal(self) -> jax.Array:
        """[] the conditional filter's log evidence estimate (biased by the reference)."""
        return self.filter.log_marginal


def csmc(
    key,
    model: ScanGF,
    args: tuple,
    observations,
    reference,
    num_particles: int,
    *,
    ancestor_sampling: bool = False,
    proposal: GenerativeFunction | None = None,
) -> CSMCResult:
    """Conditional SMC: one Markov move of a `ppl.scan` model's latent trajectory.

    A particle filter with `num_particles` particles in which particle 0 follows
    `reference` at every step. Before each step t > 0 the other N - 1 particles draw
    their ancestors by multinomial resampling; particle 0 keeps the reference's ancestor
    (itself), or with `ancestor_sampling=True` draws it with probability proportional
    to w_{t-1}^i p(x_t^ref, y_t | carry_{t-1}^i), the kernel's density (`assess`) of the
    reference's step-t choices at each particle's carry. Each free particle then
    advances by `model.step` (the kernel's prior, or `proposal` as in
    `particle_filter`); the reference advances with its own choices constrained and
    gets the weight a free particle proposing them would get. At the end one particle
    is drawn from the final weights and its path traced back through the genealogy.

    If the reference is distributed as p(x_{1:T} | y_{1:T}), so is the new trajectory,
    for any N >= 2 (the invariance particle Gibbs rests on); it equals the reference
    with a probability that falls as N grows. Ancestor sampling requires that a step's
    new carry be determined by its own choices and input (a Markov state-space model:
    carry = the state); a kernel whose new carry also depends on the old one (a
    running sum) makes the ancestor weights wrong, which `csmc` detects and reports.

    Args:
      key: a `jax.random` key.
      model: a `ppl.scan(kernel, length)` generative function.
      args: the scan's args `(init_carry, xs)`.
      observations: a choice map or dict of the kernel's observed addresses, values
        stacked along a leading axis T, as `particle_filter` takes them.
      reference: the current trajectory: a trace of `model` (e.g. `model.generate(key,
        observations, args)[0]`, or a previous result's `trajectory`), or a choice map
        of its latent choices, each [T, ...]. Values at observed addresses are ignored.
      num_particles: N >= 2, a static int.
      ancestor_sampling: redraw the reference's ancestor at each step (PGAS).
      proposal: optional generative function proposing the free particles' latent
        choices, called as in `particle_filter`.

    Returns a `CSMCResult`: `trajectory` (a trace of `model`, choices [T, ...]),
    `index` [], `filter` (the conditional run's `ParticleFilterResult`), and
    `log_weights` [N], `ancestors` [T, N], `log_marginal` [] read from it. The run is
    one jit-compiled `lax.scan`; `csmc` is jittable and vmappable as a whole.

    Errors: `ArgumentError` for a model that is not a `ppl.scan`, fewer than two
    particles, a reference of the wrong length (the message gives the expected length)
    or without a latent address of the kernel; `ObservationError` for observations of
    the wrong length. Called eagerly, `InferenceError` when the reference is impossible
    under the observations and every particle dies at a step, or when ancestor sampling
    meets a non-Markov carry (under `jax.jit`: `filter.degenerate_step` and
    `carry_mismatch_step`).

    >>> import numpyro.distributions as dist, ppl
    >>> @ppl.gen
    ... def step(x, _):
    ...     x = ppl.sample("x", dist.Normal(0.9 * x, 1.0))
    ...     ppl.sample("y", dist.Normal(x, 0.5))
    ...     return x, None
    >>> model = ppl.scan(step, length=10)
    >>> ys = jnp.linspace(-1.0, 1.0, 10)
    >>> reference, _ = model.generate(jax.random.key(0), {"y": ys}, (0.0, None))
    >>> res = csmc(jax.random.key(1), model, (0.0, None), {"y": ys}, reference, 8,
    ...            ancestor_sampling=True)
    >>> res.trajectory["x"].shape, res.log_weights.shape, res.ancestors.shape
    ((10,), (8,), (10, 8))
    """
    check_scan_model(model, _WHERE)
    key = check_key(key, model, _WHERE)
    args = check_args(args, model, _WHERE)
    n = check_num_particles(num_particles, _WHERE)
    check_proposal(proposal, _WHERE)
    num_steps = model.num_steps(args)
    observations = ChoiceMap.of(observations)
    _check_stacked(observations, num_steps, model, "observation", ObservationError)
    check_constraint_values(model, args, observations, _WHERE)
    reference = reference_choices(reference, model, args, observations, _WHERE)
    dynamic, static = partition(args)
    result = _csmc(key, dynamic, observations, reference, static=static, model=model, num_particles=n,
                   ancestor_sampling=bool(ancestor_sampling), proposal=proposal)
    _raise_if_failed(result, model)
    return result


@functools.partial(jax.jit, static_argnames=("static", "model", "num_particles", "ancestor_sampling", "proposal"))
def _csmc(key, dynamic, observations, reference, *, static, model, num_particles, ancestor_sampling, proposal):
    args = combine(dynamic, static)
    out = conditional_smc(key, model, args, observations, reference, num_particles, ancestor_sampling, proposal)
    steps, ancestors, ess, degenerate, step_log_w, log_z, mismatch, index, trajectory = out
    num_steps = ancestors.shape[0]
    degenerate_step = _first(degenerate)
    aux = (model, static, tuple(True for _ in jax.tree.leaves(steps)))
    resampled = jnp.arange(num_steps) > 0
    filtered = ParticleFilterResult(steps, aux, dynamic, log_z, step_log_w[-1], ess, ancestors, resampled,
                                    degenerate_step, step_log_w)
    return CSMCResult(trajectory, index, filtered, _first(mismatch))


def conditional_smc(key, model: ScanGF, args, observations: ChoiceMap, reference: ChoiceMap, num_particles: int,
                    ancestor_sampling: bool, proposal=None):
    """The conditional particle filter, traceable and unchecked (what `csmc` and the
    particle Gibbs kernels run).

    Returns `(steps [T, N] step traces, ancestors [T, N], ess [T], degenerate [T] bool,
    step_log_weights [T, N], log_marginal [], carry_mismatch [T] bool, index [],
    trajectory)`.
    """
    init_carry, xs = args
    num_steps = model.num_steps(args)
    n = num_particles
    kernel = model.kernel
    k_model, k_proposal, k_resample, k_ancestor, k_pick = jax.random.split(key, 5)
    indices = jnp.arange(n, dtype=jnp.uint32)
    uniform = jnp.full((n,), -math.log(n))
    proposed = _proposed_addresses(proposal, model, args, observations)

    def advance(i, carry, t, x, obs):
        """A free particle through step t: (step trace, incremental log weight, new carry)."""
        if proposal is None:
            return model.step(particle_key(k_model, i), t, carry, x, obs)
        q = proposal.simulate(particle_key(jax.random.fold_in(k_proposal, t), i), (carry, x, obs))
        tr, w, new_carry = model.step(particle_key(k_model, i), t, carry, x, obs.merge(q.choices))
        return tr, w - q.score, new_carry

    def advance_reference(carry, t, x, obs, ref):
        """The reference through step t, with the weight a free particle proposing its
        choices would get: the density of the observed and proposed choices and the
        factors (the kernel's prior draws the rest), less the proposal's density."""
        tr, _, new_carry = model.step(particle_key(k_model, 0), t, carry, x, obs.merge(ref))
        inc = kernel.project(tr, select(*obs.addresses(), *proposed))
        if proposal is not None:
            inc = inc - proposal.assess(ref.filter(select(*proposed)), (carry, x, obs))[0]
        return tr, inc, new_carry

    def reference_ancestor(t, carry, log_w, x, obs, ref):
        """The reference's ancestor drawn from w_{t-1}^i p(ref_t, obs_t | carry^i), and
        whether some possible ancestor would give the reference another new carry."""
        def transition(c):
            lp, retval = kernel.assess(obs.merge(ref), (c, x))
            return lp, retval[0]

        lp, new_carry = jax.vmap(transition)(carry)
        logits = log_w + lp
        is_possible = logits > -jnp.inf
        has_any = jnp.any(is_possible)
        a = jax.random.categorical(jax.random.fold_in(k_ancestor, t), jnp.where(has_any, logits, 0.0))
        a = jnp.where(has_any, a, 0).astype(jnp.int32)
        same = [jnp.all((_comparable(c) == _comparable(c[a])).reshape(n, -1), axis=1)
                for c in jax.tree.leaves(new_carry)]
        mismatch = jnp.any(is_possible & ~jnp.all(jnp.stack(same), axis=0)) if same else jnp.zeros((), bool)
        return a, mismatch

    def body(state, inputs):
        carry, log_w, log_z = state
        t, x, obs, ref = inputs
        free = multinomial(jax.random.fold_in(k_resample, t), log_w, n - 1)
        if ancestor_sampling:
            first, mismatch = reference_ancestor(t, carry, log_w, x, obs, ref)
            mismatch = mismatch & (t > 0)
        else:
            first, mismatch = jnp.zeros((), jnp.int32), jnp.zeros((), bool)
        ancestors = jnp.concatenate([first[None], free])
        ancestors = jnp.where(t > 0, ancestors, jnp.arange(n, dtype=jnp.int32))
        carry = jax.tree.map(lambda c: c[ancestors], carry)
        tr, inc, new_carry = jax.vmap(lambda i, c: advance(i, c, t, x, obs))(indices, carry)
        ref_tr, ref_inc, ref_carry = advance_reference(jax.tree.map(lambda c: c[0], carry), t, x, obs, ref)
        tr = jax.tree.map(lambda a, b: a.at[0].set(b), tr, ref_tr)
        new_carry = jax.tree.map(lambda a, b: a.at[0].set(b), new_carry, ref_carry)
        log_w = uniform + jnp.broadcast_to(inc, (n,)).at[0].set(ref_inc)
        log_z_t = logsumexp(log_w)
        is_bad = ~jnp.isfinite(log_z_t)
        log_w = jnp.where(is_bad, uniform, log_w - log_z_t)
        ess = jnp.where(is_bad, 0.0, jnp.exp(-logsumexp(2.0 * log_w)))
        return (new_carry, log_w, log_z + log_z_t), (tr, ancestors, ess, is_bad, log_w, mismatch)

    carry0 = jax.tree.map(lambda c: jnp.broadcast_to(_strong(c), (n,) + jnp.shape(c)), init_carry)
    state0 = (carry0, uniform, jnp.zeros(()))
    (_, log_w, log_z), (steps, ancestors, ess, degenerate, step_log_w, mismatch) = jax.lax.scan(
        body, state0, (jnp.arange(num_steps), xs, observations, reference), length=num_steps)
    index = jax.random.categorical(k_pick, log_w).astype(jnp.int32)
    path = _lineage(ancestors)[:, index]  # [T]: the drawn particle's index at each step
    chosen = jax.tree.map(lambda leaf: leaf[jnp.arange(num_steps), path], steps)
    trajectory = model.assemble(args, chosen)
    return steps, ancestors, ess, degenerate, step_log_w, log_z, mismatch, index, trajectory


# -- checks shared with the particle Gibbs kernels and backward simulation ----------------------


def check_scan_model(model, where: str) -> None:
    if not isinstance(model, ScanGF):
        what = model.__name__ if isinstance(model, GenerativeFunction) else type(model).__name__
        raise ArgumentError(
            f"{where}: the model must be a state-space model written as ppl.scan(kernel, length=T), with "
            f"kernel a generative function (carry, x) -> (new_carry, y) that samples one step; got {what}. "
            "Wrap the per-step model: model = ppl.scan(step, length=T), called with args (init_carry, xs).")


def check_num_particles(num_particles, where: str) -> int:
    is_int = isinstance(num_particles, (int, np.integer)) and not isinstance(num_particles, bool)
    if not is_int or num_particles < 2:
        raise ArgumentError(
            f"{where}: num_particles must be an int >= 2 (particle 0 is the reference; the others search), "
            f"got {num_particles!r}.")
    return int(num_particles)


def check_proposal(proposal, where: str) -> None:
    if proposal is not None and not isinstance(proposal, GenerativeFunction):
        raise ArgumentError(
            f"{where}: proposal must be a generative function called with args (carry, x, observations_t), "
            f"got {type(proposal).__name__}.")


def reference_choices(reference, model: ScanGF, args, observations: ChoiceMap, where: str) -> ChoiceMap:
    """The reference's latent choices, each [T, ...], checked against the kernel's."""
    if isinstance(reference, Trace):
        reference = reference.choices
    elif not isinstance(reference, (ChoiceMap, dict)):
        raise ArgumentError(
            f"{where}: reference must be a trace of {model.__name__} or a choice map of its latent choices "
            f"(each stacked over the steps, [T, ...]), got {type(reference).__name__}.")
    reference = ChoiceMap.of(reference)
    observed = observations.addresses()
    reference = reference.filter(~select(*observed)) if observed else reference
    num_steps = model.num_steps(args)
    _check_stacked(reference, num_steps, model, "reference trajectory", ArgumentError, where)
    latent = latent_addresses(model, args, observations)
    missing = [a for a in latent if a not in reference]
    if missing:
        raise ArgumentError(
            f"{where}: the reference trajectory has no value at {', '.join(map(format_address, missing))}; it "
            f"must hold every latent choice of {model.kernel.__name__} at every step "
            f"(latent addresses: {', '.join(map(format_address, latent))}).")
    extra = [a for a in reference.addresses() if a not in set(latent)]
    if extra:
        raise ArgumentError(
            f"{where}: the reference trajectory has {', '.join(map(format_address, extra))}, which is no "
            f"latent choice of {model.kernel.__name__} (latent addresses: "
            f"{', '.join(map(format_address, latent)) or 'none'}).")
    return reference


def latent_addresses(model: ScanGF, args, observations: ChoiceMap) -> list:
    """The kernel's choice addresses at a step that `observations` does not constrain."""
    init_carry, xs = args

    def first_step(obs):
        x = jax.tree.map(lambda leaf: leaf[0], xs)
        return model.step(jax.random.key(0), 0, init_carry, x, jax.tree.map(lambda leaf: leaf[0], obs))[0]

    shape = jax.eval_shape(first_step, observations)
    observed = set(observations.addresses())
    return [a for a in shape.choices.addresses() if a not in observed]


def _check_stacked(choices: ChoiceMap, num_steps: int, model: ScanGF, what: str, error, where: str = _WHERE) -> None:
    for address, value in choices.flat_items():
        shape = tuple(jnp.shape(value))
        if not shape or shape[0] != num_steps:
            steps = f"{shape[0]} steps" if shape else "no time axis"
            raise error(
                f"{where}: the {what} at {format_address(address)} has shape {shape} ({steps}), but "
                f"{model.__name__} runs {num_steps} steps: expected a leading axis of length {num_steps} (one "
                f"value per step, time first), shape ({num_steps}, ...).")


def _proposed_addresses(proposal, model: ScanGF, args, observations: ChoiceMap) -> tuple:
    if proposal is None:
        return ()
    init_carry, xs = args

    def propose(obs):
        x = jax.tree.map(lambda leaf: leaf[0], xs)
        obs0 = jax.tree.map(lambda leaf: leaf[0], obs)
        return proposal.simulate(jax.random.key(0), (_strong(init_carry), x, obs0)).choices

    return tuple(jax.eval_shape(propose, observations).addresses())


def _comparable(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def _first(flags):
    return jnp.where(jnp.any(flags), jnp.argmax(flags), -1).astype(jnp.int32)


def _raise_if_failed(result: CSMCResult, model: ScanGF) -> None:
    status = (result.filter.degenerate_step, result.carry_mismatch_step)
    if not all(is_concrete(s) for s in status):
        return  # under a user's jit: the fields report it
    dead, mismatch = (int(s) for s in status)
    if dead >= 0:
        raise InferenceError(
            f"{_WHERE}: at step {dead} (of {result.filter.num_steps}, counting from 0) every particle, the "
            "reference included, has log weight -inf (or a weight is NaN): the reference trajectory is "
            "impossible under the observations there, or the model's density is invalid. Pass a reference "
            "drawn with model.generate(key, observations, args).")
    if mismatch >= 0:
        raise InferenceError(
            f"{_WHERE}: ancestor sampling at step {mismatch}: the kernel {model.kernel.__name__} returns a new "
            "carry that depends on the previous carry, not only on the step's choices and input, so the "
            "reference's future would change with its ancestor and the ancestor weights "
            "w_(t-1) p(x_t, y_t | carry_(t-1)) would be wrong. Make the carry the state itself (sample the "
            "state, not an increment), or run with ancestor_sampling=False.")
