"""Particle filtering of a `ppl.scan` state-space model, one `lax.scan` over its steps.

`particle_filter` advances N particles through the scan one step at a time with
`ScanGF.step` (the kernel's `generate` at the step's carry and input, under the key
step `t` of a whole run would use), weights them by the step's observations, and
resamples (a gather over the particles' carries) when the effective sample size falls
below `ess_threshold * N`. The whole run is one jit-compiled `lax.scan`; particle `i`
draws with `ppl.particle_key(key, i)`, so a step costs about one hash per drawn value,
as batched hand-written code. The step traces of every step are kept ([T, N, ...]),
and `ParticleFilterResult.paths()` traces each final particle's genealogy back
through `ancestors` to rebuild whole trajectories as traces of the scan model. With
`history="choices"` only each step's choices, scores and reward / factor values are
kept (`StepChoices`), not the traces' carries (a language model's KV caches), and
`paths()` recomputes the carries by running the model on each path's choices.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal, jaxpr_as_fun
from jax.scipy.special import logsumexp

from inference._checks import check_constraint_values
from ppl import ArgumentError, ChoiceMap, GenerativeFunction, InferenceError, ObservationError, ScanGF, Trace
from ppl import UnknownAddressError, particle_key
from ppl.extend import check_args, check_key, combine, format_address, is_concrete, partition, site_scores, suggest

from ._resampling import get_resampler

__all__ = ["particle_filter", "ParticleFilterResult", "StepChoices"]

_WHERE = "smc.particle_filter"
HISTORIES = ("traces", "choices")


@jax.tree_util.register_pytree_node_class
class ParticleFilterResult:
    """The output of `particle_filter` over T steps with N particles.

    Fields:
      log_marginal:    [] log of the unbiased estimate of the evidence p(observations):
                       the sum over steps of log sum_i W_{t-1}^i exp(w_t^i), with W the
                       normalized weights before step t and w_t the step's incremental
                       log weights. -inf when a step left every particle impossible.
      log_weights:     [N] normalized log weights of the final particles (logsumexp = 0).
      ess:             [T] effective sample size after each step's reweighting (before
                       any resampling at the next step), in [1, N]; 0 at a degenerate step.
      ancestors:       [T, N] int32: particle j of step t extends particle ancestors[t, j]
                       of step t - 1 (ancestors[0] = arange(N); a row is arange(N) where
                       the filter did not resample).
      resampled:       [T] bool: whether the particles were resampled before step t.
      degenerate_step: [] int32: the first step at which every weight became -inf (or a
                       weight NaN or +inf), -1 if none. Called eagerly, the filter raises
                       instead; under `jax.jit` check this field.
      step_log_weights: [T, N] normalized log weights of each step's particles after
                       that step's reweighting (before any resampling at the next step);
                       the last row is `log_weights`. Backward smoothing reads them.
      is_finished:     [T, N] bool, with `particle_filter(..., is_finished=f)`: `f` of each
                       stored step trace's new carry, i.e. whether particle j had finished
                       after step t (None without `is_finished`).
      particles:       (property) the final step's kernel traces, a batch of N traces:
                       `particles["x"].shape == (N, ...)`, weighted by `log_weights`.
      step_particles:  (property) every step's kernel traces, `step_particles["x"]` of
                       shape (T, N, ...), step t weighted by `step_log_weights[t]`.

    `paths()` gives each final particle's whole trajectory, its genealogy traced back
    through `ancestors`: a batch of N traces of the scan model, choices [N, T, ...].
    Leaves that are the same for every particle (observations, inputs) are stored once
    per step and broadcast on access.

    With `particle_filter(..., history="choices")` (`history` says which) the stored
    steps are `StepChoices` instead of traces: `particles` and `step_particles` then
    hold each step's choices, score and reward / factor / observed values (indexed as
    traces are: `particles["x"]`, `.choices`, `.score`) but no carries, and `paths()`
    recomputes whole traces from the paths' choices.
    """

    def __init__(self, steps, aux, dynamic_args, log_marginal, log_weights, ess, ancestors, resampled,
                 degenerate_step, step_log_weights=None, is_finished=None):
        self._steps = steps  # kernel traces stacked over steps, [T, N, ...] or [T, ...] (shared)
        self._aux = aux  # (model, static part of args, per-leaf is_batched flags of _steps)
        self._dynamic_args = dynamic_args
        self.log_marginal = log_marginal
        self.log_weights = log_weights
        self.ess = ess
        self.ancestors = ancestors
        self.resampled = resampled
        self.degenerate_step = degenerate_step
        self.step_log_weights = step_log_weights
        self.is_finished = is_finished

    @property
    def num_particles(self) -> int:
        return self.log_weights.shape[-1]

    @property
    def num_steps(self) -> int:
        return self.ancestors.shape[-2]

    @property
    def model(self) -> ScanGF:
        return self._aux[0]

    @property
    def args(self) -> tuple:
        """The scan's args `(init_carry, xs)` the filter ran with."""
        return combine(self._dynamic_args, self._aux[1])

    def normalized_weights(self) -> jax.Array:
        """[N] final weights summing to one."""
        return jnp.exp(self.log_weights)

    @property
    def particles(self) -> Trace:
        """The final particles: the kernel's traces at the last step, leaves [N, ...]."""
        n = self.num_particles
        leaves, treedef = jax.tree.flatten(self._steps)
        out = [leaf[-1] if batched else jnp.broadcast_to(leaf[-1], (n,) + jnp.shape(leaf)[1:])
               for leaf, batched in zip(leaves, self._aux[2])]
        return jax.tree.unflatten(treedef, out)

    @property
    def step_particles(self) -> Trace:
        """Every step's particles: the kernel's traces stacked over steps, leaves [T, N, ...].

        Step t's particles, weighted by `step_log_weights[t]`, approximate the filtering
        distribution p(latents_t | observations_0..t) (with `rejuvenation`, as moved).
        """
        shape = self.ancestors.shape
        leaves, treedef = jax.tree.flatten(self._steps)
        out = [leaf if batched else jnp.broadcast_to(leaf[:, None], shape + jnp.shape(leaf)[1:])
               for leaf, batched in zip(leaves, self._aux[2])]
        return jax.tree.unflatten(treedef, out)

    def paths(self) -> Trace:
        """Whole trajectories of the final particles: N traces of the scan model.

        Particle j's path follows its genealogy back from the last step: its index at
        step t - 1 is `ancestors[t]` of its index at step t. Returns a batch of scan
        traces (choices [N, T, ...], `score` [N] the log joint of each path, args
        broadcast to [N, ...]); path j ends in `particles` j and carries weight
        `log_weights[j]`. With `history="choices"` the carries were not kept: the scan
        is run again with each path's choices given (`model.generate`), one model run
        per path; the choices are the stored ones and the score equals the sum of the
        stored step scores (to float rounding).
        """
        model, _, is_batched = self._aux
        indices = _lineage(self.ancestors)  # [T, N]: the index of path j at step t
        time = jnp.arange(indices.shape[0])[:, None]
        leaves, treedef = jax.tree.flatten(self._steps)
        gathered = [jnp.moveaxis(leaf[time, indices], 0, 1) if batched else leaf
                    for leaf, batched in zip(leaves, is_batched)]
        in_axes = jax.tree.unflatten(treedef, [0 if b else None for b in is_batched])
        args = self.args
        if isinstance(self._steps, StepChoices):
            # No carries were kept: run the scan with every choice of the path given. All
            # randomness is in the choices, so this is the trajectory the filter built
            # (the key is never used).
            def replay(steps):
                return model.generate(jax.random.key(0), steps.choices, args)[0]

            return jax.vmap(replay, in_axes=(in_axes,))(jax.tree.unflatten(treedef, gathered))
        return jax.vmap(lambda steps: model.assemble(args, steps), in_axes=(in_axes,))(
            jax.tree.unflatten(treedef, gathered))

    @property
    def history(self) -> str:
        """What the result keeps of each step: "traces" (the kernel's traces) or "choices"
        (`StepChoices`: choices, scores and reward / factor values, no carries)."""
        return "choices" if isinstance(self._steps, StepChoices) else "traces"

    def __repr__(self):
        return (f"ParticleFilterResult(num_particles={self.num_particles}, num_steps={self.num_steps}, "
                f"log_marginal={self.log_marginal})")

    def tree_flatten(self):
        children = (self._steps, self._dynamic_args, self.log_marginal, self.log_weights, self.ess,
                    self.ancestors, self.resampled, self.degenerate_step, self.step_log_weights,
                    self.is_finished)
        return children, self._aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        steps, dynamic_args, *rest = children
        return cls(steps, aux, dynamic_args, *rest)


@jax.tree_util.register_pytree_node_class
class StepChoices:
    """What `particle_filter(..., history="choices")` keeps of a batch of step traces.

    The parts of the kernel's step traces that do not hold the carry: a step trace's
    args and return value hold the particle's carry before and after the step (for a
    language model, its KV caches), and a filter's history of T steps would otherwise
    keep them for every step. Leading axes B: [T, N] in `step_particles`, [N] in
    `particles` and one path step per row of `paths()`'s input.

    Fields:
      choices:     `ChoiceMap` of the step's random choices, leaves [*B, ...].
      score:       [*B] the step trace's score (its log joint, factors included).
      values:      dict path -> [*B, ...] the value `trace[path]` reads at each reward,
                   factor and observed site (deterministic sites are not kept: they may
                   be the carry).
      site_scores: dict path -> [*B] each site's log density or log weight
                   (`ppl.extend.site_scores` of the trace).

    `record[address]` reads a choice or a kept value, as `trace[address]` does. `args`,
    `retval` and `inner` raise `ArgumentError`: they are what was not kept.
    """

    def __init__(self, choices: ChoiceMap, score, values: dict, site_scores: dict):
        self.choices = choices
        self.score = score
        self.values = values
        self.site_scores = site_scores

    @classmethod
    def of(cls, trace: Trace) -> StepChoices:
        """The record of one step trace (also under `jax.vmap` over a batch of them)."""
        scores = site_scores(trace)
        choices = trace.choices
        values = {}
        for path in scores:
            if path in choices:
                continue
            try:
                values[path] = trace[path]
            except UnknownAddressError:  # a site a combinator scores but does not name
                continue
        return cls(choices, trace.score, values, scores)

    def __getitem__(self, address):
        path = (address,) if isinstance(address, str) else tuple(address)
        if path in self.choices:
            return self.choices[path]
        if path in self.values:
            return self.values[path]
        known = list(self.choices.addresses()) + list(self.values)
        raise UnknownAddressError(
            f"{_WHERE}: the history (history='choices') has no value at {format_address(path)}. It keeps "
            f"the choices {', '.join(format_address(a) for a in self.choices.addresses()) or '(none)'} and the "
            f"reward / factor / observed values {', '.join(format_address(a) for a in self.values) or '(none)'}."
            + suggest(path, known) + " Deterministic values and carries are kept with history='traces'.")

    def _missing(self, name):
        raise ArgumentError(
            f"{_WHERE}: this result was run with history='choices', which keeps each step's choices, score "
            f"and reward / factor values but not the step traces' {name} (the carries). Run "
            "smc.particle_filter(..., history='traces') (the default) to keep whole traces, or use "
            "result.paths(), which recomputes them.")

    @property
    def args(self):
        self._missing("args")

    @property
    def retval(self):
        self._missing("retval")

    @property
    def inner(self):
        self._missing("inner")

    def __repr__(self):
        return f"StepChoices(score={self.score!r}, choices={self.choices!r})"

    def tree_flatten(self):
        return (self.choices, self.score, self.values, self.site_scores), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def particle_filter(
    key,
    model: ScanGF,
    args: tuple,
    observations,
    num_particles: int,
    proposal: GenerativeFunction | None = None,
    resampling="systematic",
    ess_threshold: float = 0.5,
    rejuvenation=None,
    is_finished=None,
    *,
    history: str = "traces",
) -> ParticleFilterResult:
    """Sequential Monte Carlo over the steps of a `ppl.scan` state-space model.

    At each step t = 0..T-1: if t > 0 and ESS / N < `ess_threshold`, resample (draw
    ancestors with `resampling`, gather every particle's carry, reset the weights to
    uniform); then advance each particle with `model.step` under the step's
    observations and add the step's incremental log weight. With the default bootstrap
    proposal the latents come from the kernel's prior and the increment is `generate`'s
    weight, log p(y_t, factors_t | latents_t, carry). With a `proposal` generative
    function, called as `proposal.simulate(key, (carry, x_t, observations_t))` with
    `observations_t` the step's observations (a `ChoiceMap`), its choices (named by
    the kernel's latent addresses) are constrained in `generate` and the increment is
    `generate`'s weight minus the proposal's score.

    Args:
      key: a `jax.random` key.
      model: a `ppl.scan(kernel, length)` generative function.
      args: the scan's args `(init_carry, xs)`; `xs` (leading axis T) or None.
      observations: a choice map or dict of the kernel's addresses, each holding every
        step's values stacked along a leading axis T, e.g. `{"y": ys}` with ys [T, ...].
      num_particles: N, a static int.
      proposal: optional generative function proposing each step's latent choices.
      resampling: "systematic" (default), "stratified", "residual", "multinomial", or
        a function `(key, log_weights [N], n) -> ancestors [n] int32`.
      ess_threshold: resample before step t when ESS < ess_threshold * N; a number in
        [0, 1]: 1.0 resamples before every step, 0.0 never.
      rejuvenation: None, or an `inference.Kernel` applied once to every particle each
        time the filter resamples (use `inference.cycle(k, k, ...)` for several steps).
        It moves the latent choices of the step the particles have just completed: the
        kernel runs on that step's trace, a trace of the scan's kernel at the particle's
        parent carry and input, `(carry_{t-1}, x_t)`, with step t's observations fixed,
        so it targets p(latents_t | carry_{t-1}, x_t, observations_t), the conditional
        of the filtering distribution given the particle's past; the particles are
        equally weighted after resampling, so the filtering distribution is left
        invariant, and the evidence estimate is unchanged in law. The moved trace's new
        carry continues the particle. Any kernel on a generative-function trace fits:
        `inference.mh("x")`, `inference.mh_proposal(q)`, `inference.hmc(...)` (step 0's
        particles are moved at the first resampling, the last step's are not moved).

      history: what the result keeps of each step's particles. "traces" (default):
        the kernel's step traces, [T, N, ...], whose args and return value hold each
        particle's carry before and after the step. "choices": a `StepChoices` per
        step, the choices, score and reward / factor / observed values only, not the
        carries: for a language model whose carry is a KV cache this is most of the
        memory a run returns. The run itself (weights, ancestors, evidence, choices)
        is the same bit for bit; `particles` and `step_particles` are then
        `StepChoices` ([N, ...] and [T, N, ...]), and `paths()` recomputes whole traces
        by running the model on each path's choices.

    Returns a `ParticleFilterResult`: log_marginal [], log_weights [N] (normalized),
    ess [T], ancestors [T, N], resampled [T], degenerate_step [], `particles` (the last
    step's traces, [N, ...]) and `paths()` (whole trajectories, choices [N, T, ...]).
    The filter is one jit-compiled `lax.scan`; it is jittable and vmappable as a whole
    (e.g. over keys). With `rejuvenation`, the stored step-t traces are the moved ones
    (as the filter continued from them), `particles` the last step's, and `ancestors`
    row t links them: row t is the resampling before step t + 1 (the moved particles
    are indexed as after it), the first and last rows are `arange(N)`; `paths()` and
    `step_log_weights` follow (uniform at a step whose particles were resampled).

    Early stopping. A particle stops through the model, not the filter: the kernel
    keeps a `done` flag in its carry and wraps its step in `ppl.mask`, so that once
    `done` holds the step adds nothing to the score or the weight and returns the carry
    unchanged. Such a particle keeps its weight (its increments are 0) and its carry;
    it stays in the population, is counted in the ESS and is resampled like any other
    (dropping or copying it by its weight is what keeps the evidence estimate
    unbiased). The filter needs nothing more to be correct. `is_finished`, a function
    of one particle's carry returning a boolean scalar, tells it which particles are
    done, so that it can save work: (1) rejuvenation leaves a particle alone whose
    last step was masked (finished before it; its placeholders have no target to
    move to); (2) once every particle is finished, the remaining steps are not run:
    no kernel evaluation (after one all-masked step, whose trace is then stored for
    every later step, with the step's own input), no resampling, weights and evidence
    unchanged; (3) the result's `is_finished` [T, N] says which particles had finished
    after each step. `is_finished` is a promise about the model: a particle that it
    calls finished before a step gets a zero increment and an unchanged carry from
    that step; called eagerly, the filter raises `ArgumentError` naming the step if
    the model breaks it.

    Errors: `ArgumentError` for a model that is not a `ppl.scan`, an `ess_threshold`
    outside [0, 1], an unknown resampling name, a `rejuvenation` that is not an
    `inference.Kernel` or comes with `ess_threshold=0.0` (which never resamples), a
    `history` other than "traces" or "choices", an
    `is_finished` that is not a function of the carry returning a boolean scalar (or,
    eagerly, a model that changes a finished particle); `ObservationError` for observations
    whose leading axis is not the number of steps T, or non-finite. Called eagerly, a
    step at which every particle has log weight -inf (or a weight is NaN or +inf)
    raises `InferenceError` naming the step and the site; under `jax.jit` the result is
    returned without NaN (log_marginal = -inf, the weights reset to uniform, ess 0 at
    that step) and `degenerate_step` holds the step.

    >>> import numpyro.distributions as dist, ppl
    >>> @ppl.gen
    ... def step(x, _):
    ...     x = ppl.sample("x", dist.Normal(0.9 * x, 1.0))
    ...     ppl.sample("y", dist.Normal(x, 0.5))
    ...     return x, None
    >>> model = ppl.scan(step, length=10)
    >>> ys = jnp.linspace(-1.0, 1.0, 10)
    >>> res = particle_filter(jax.random.key(0), model, (0.0, None), {"y": ys}, 100)
    >>> res.log_marginal.shape, res.ess.shape, res.ancestors.shape, res.particles["x"].shape
    ((), (10,), (10, 100), (100,))
    >>> res.paths()["x"].shape
    (100, 10)
    """
    if not isinstance(model, ScanGF):
        what = model.__name__ if isinstance(model, GenerativeFunction) else type(model).__name__
        raise ArgumentError(
            f"{_WHERE}: the model must be a state-space model written as ppl.scan(kernel, length=T), "
            f"with kernel a generative function (carry, x) -> (new_carry, y) that samples one step; got "
            f"{what}. Wrap the per-step model: model = ppl.scan(step, length=T), called with args "
            "(init_carry, xs)."
        )
    key = check_key(key, model, _WHERE)
    args = check_args(args, model, _WHERE)
    is_int = isinstance(num_particles, (int, np.integer)) and not isinstance(num_particles, bool)
    if not is_int or num_particles < 1:
        raise ArgumentError(f"{_WHERE}: num_particles must be a positive int, got {num_particles!r}.")
    ess_threshold = _check_threshold(ess_threshold)
    resampler = get_resampler(resampling, _WHERE)
    if proposal is not None and not isinstance(proposal, GenerativeFunction):
        raise ArgumentError(
            f"{_WHERE}: proposal must be a generative function called with args (carry, x, observations_t), "
            f"got {type(proposal).__name__}."
        )
    _check_rejuvenation(rejuvenation, ess_threshold)
    if is_finished is not None and not callable(is_finished):
        raise ArgumentError(
            f"{_WHERE}: is_finished must be a function of one particle's carry returning a boolean scalar, "
            f"e.g. lambda carry: carry[1] for a carry (x, done); got {type(is_finished).__name__}.")
    if history not in HISTORIES:
        raise ArgumentError(
            f"{_WHERE}: history must be 'traces' (keep every step's traces, carries included) or 'choices' "
            f"(keep each step's choices, score and reward / factor values only), got {history!r}.")
    num_steps = model.num_steps(args)
    observations = ChoiceMap.of(observations)
    _check_observations(observations, num_steps, model)
    check_constraint_values(model, args, observations, _WHERE)
    dynamic, static = partition(args)
    result, status = _particle_filter(
        key, dynamic, observations, static=static, model=model, num_particles=int(num_particles),
        proposal=proposal, resampler=resampler, ess_threshold=ess_threshold, rejuvenation=rejuvenation,
        is_finished=is_finished, history=history,
    )
    _raise_if_degenerate(result, status[0])
    _raise_if_unfinished(result, status[1])
    return result


@functools.partial(jax.jit, static_argnames=("static", "model", "num_particles", "proposal", "resampler",
                                             "ess_threshold", "rejuvenation", "is_finished", "history"))
def _particle_filter(key, dynamic, observations, *, static, model, num_particles, proposal, resampler,
                     ess_threshold, rejuvenation=None, is_finished=None, history="traces"):
    args = combine(dynamic, static)
    init_carry, xs = args
    num_steps = model.num_steps(args)
    n = num_particles
    k_model, k_proposal, k_resample = jax.random.split(key, 3)
    indices = jnp.arange(n, dtype=jnp.uint32)
    uniform = jnp.full((n,), -math.log(n))

    def advance(i, carry, t, x, obs):
        """Particle i through step t: (step trace, incremental log weight, new carry)."""
        if proposal is None:
            return model.step(particle_key(k_model, i), t, carry, x, obs)
        q = proposal.simulate(particle_key(jax.random.fold_in(k_proposal, t), i), (carry, x, obs))
        _check_proposed(q.choices, obs, proposal)
        tr, w, new_carry = model.step(particle_key(k_model, i), t, carry, x, obs.merge(q.choices))
        return tr, w - q.score, new_carry

    def resample(t, carry, log_w, all_done):
        ess = jnp.exp(-logsumexp(2.0 * log_w))
        # Once every particle is finished the weights never change again: resampling
        # would only add noise.
        do = (t > 0) & ((ess < ess_threshold * n) | (ess_threshold >= 1.0)) & ~all_done
        ancestors = jax.lax.cond(
            do, lambda: resampler(jax.random.fold_in(k_resample, t), log_w, n).astype(jnp.int32),
            lambda: jnp.arange(n, dtype=jnp.int32))
        carry = jax.tree.map(lambda c: c[ancestors], carry)
        return carry, jnp.where(do, uniform, log_w), ancestors, do

    flags = []  # per-leaf is_batched flags of a step's traces and of their StepChoices
    light = history == "choices"
    observed = tuple(observations.addresses())
    k_rejuvenate = jax.random.fold_in(key, 0x4E7)

    def rejuvenate(t, prev, ancestors, did, carry):
        """After a resampling, one kernel step on each particle's last step trace (gathered
        by `ancestors`); returns the moved traces and the carries they end in."""

        def move(prev):
            gathered = jax.tree.map(lambda leaf: leaf[ancestors], prev)

            def one(k, trace):
                state = rejuvenation.init(trace, observed=observed, num_warmup=0)
                moved = rejuvenation.step(k, state)[0].trace
                if is_finished is None:
                    return moved
                # A step that began finished was masked: nothing of it to move.
                return _where(_finished(trace.args[0]), trace, moved)

            moved = jax.vmap(one)(jax.random.split(jax.random.fold_in(k_rejuvenate, t), n), gathered)
            moved = jax.tree.map(lambda a, b: a.astype(b.dtype), moved, prev)
            return moved, _like_carry(moved.retval[0], carry, model)

        return jax.lax.cond(did, move, lambda prev: (prev, carry), prev)

    def _finished(one_carry):
        flag = is_finished(one_carry)
        if jnp.shape(flag) != () or not (jnp.result_type(flag) == jnp.bool_):
            raise ArgumentError(
                f"{_WHERE}: is_finished must return a boolean scalar for one particle's carry, got "
                f"{jnp.result_type(flag)}{list(jnp.shape(flag))}. Write it for one particle, e.g. "
                "lambda carry: carry[1] for a carry (x, done).")
        return flag

    def run_step(t, x, obs, carry):
        """Every particle through step t: (traces, increments [N], new carries, and with
        history="choices" the traces' `StepChoices`, else None)."""

        def one(i, c):
            tr, inc, new_carry = advance(i, c, t, x, obs)
            return tr, inc, new_carry, StepChoices.of(tr) if light else None

        (tr, inc, new_carry, record), is_batched = _vmap_shared(one, indices, carry)
        num_tr, num_record = len(jax.tree.leaves(tr)), len(jax.tree.leaves(record))
        flags[:] = [is_batched[:num_tr], is_batched[-num_record:] if num_record else ()]
        new_carry = _like_carry(new_carry, carry, model)
        return tr, jnp.broadcast_to(inc, (n,)), new_carry, record

    def light_history(traces, new_carry):
        """What the history keeps of a batch of step traces (every leaf batched) with
        history="choices": their `StepChoices`, and whether each particle has finished."""
        done = None if is_finished is None else jax.vmap(_finished)(new_carry)
        return jax.vmap(StepChoices.of)(traces), done

    def body(state, inputs):
        carry, log_w, log_z, *extra = state
        t, x, obs = inputs
        if is_finished is not None:
            saved, has_saved = extra[-2:]
            done = jax.vmap(_finished)(carry)
            all_done = jnp.all(done)
        else:
            all_done = jnp.zeros((), bool)
        if ess_threshold > 0.0:
            carry, log_w, ancestors, did = resample(t, carry, log_w, all_done)
        else:
            ancestors, did = jnp.arange(n, dtype=jnp.int32), jnp.zeros((), bool)
        if rejuvenation is not None:
            moved, carry = rejuvenate(t, extra[0], ancestors, did, carry)
        if is_finished is not None and (ess_threshold > 0.0 or rejuvenation is not None):
            # The particles as they enter the step: resampled, and perhaps moved (a move
            # can redraw the choice that finished a particle). Unchanged if all were done.
            done = jax.vmap(_finished)(carry)
            all_done = jnp.all(done)
        if is_finished is None:
            tr, inc, new_carry, record = run_step(t, x, obs, carry)
            is_broken = jnp.zeros((), bool)
        else:
            # Every particle finished before this step and one all-masked step already
            # run: reuse its traces (zero score, same carries) instead of the kernel.
            def computed():
                tr, inc, new_carry, _ = run_step(t, x, obs, carry)
                return _broadcast_batch(tr, flags[0], n), inc, new_carry

            skip = all_done & has_saved
            tr, inc, new_carry = jax.lax.cond(
                skip, lambda: (_with_input(saved, x, n), jnp.zeros((n,), inc_dtype[0]), carry), computed)
            is_broken = jnp.any(done & (inc != 0.0)) | jnp.any(done & ~_same_carry(new_carry, carry))
            saved = jax.lax.cond(all_done, lambda: tr, lambda: saved)
            has_saved = has_saved | all_done
        log_w = log_w + inc
        log_z_t = logsumexp(log_w)
        is_dead = jnp.isneginf(log_z_t)
        is_bad = jnp.isnan(log_z_t) | jnp.isposinf(log_z_t)
        log_w = jnp.where(is_dead | is_bad, uniform, log_w - log_z_t)
        log_z_t = jnp.where(all_done, 0.0, log_z_t)
        ess = jnp.where(is_dead | is_bad, 0.0, jnp.exp(-logsumexp(2.0 * log_w)))
        new_state = (new_carry, log_w, log_z + log_z_t)
        if rejuvenation is not None:  # keep this step's traces, emit the previous step's, moved
            if is_finished is None:  # (with it, `computed` broadcast them already)
                tr = _broadcast_batch(tr, flags[0], n)
            new_state += (tr,)
            out = light_history(moved, model._split_retval(moved.retval)[0]) if light else moved
        elif not light:
            out = tr
        elif is_finished is None:
            out = (record, None)  # leaves shared by every particle stay unbatched (flags[1])
        else:
            out = light_history(tr, new_carry)
        if is_finished is not None:
            new_state += (saved, has_saved)
        return new_state, (out, ancestors, ess, did, is_dead | is_bad, log_w, is_broken)

    carry0 = jax.tree.map(lambda c: jnp.broadcast_to(_strong(c), (n,) + jnp.shape(c)), init_carry)
    state0 = (carry0, uniform, jnp.zeros(()))

    def first_traces():
        first = jax.tree.map(lambda leaf: leaf[0], (xs, observations))
        (tr, inc, _), is_batched = _vmap_shared(lambda i, c: advance(i, c, 0, *first), indices, carry0)
        return _broadcast_batch(tr, is_batched[: len(jax.tree.leaves(tr))], n), inc

    inc_dtype = []
    if rejuvenation is not None or is_finished is not None:  # placeholders for traces, never read
        shapes, inc_shape = jax.eval_shape(first_traces)
        inc_dtype.append(inc_shape.dtype)
        placeholder = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        if rejuvenation is not None:
            state0 += (placeholder,)
        if is_finished is not None:
            state0 += (placeholder, jnp.zeros((), bool))
    try:
        (_, log_w, log_z, *last), (steps, ancestors, ess, resampled, degenerate, step_log_w, broken) = (
            jax.lax.scan(body, state0, (jnp.arange(num_steps), xs, observations), length=num_steps))
    except TypeError as e:
        if "carry" not in str(e):
            raise
        raise ArgumentError(
            f"{_WHERE}: the kernel {model.kernel.__name__} must return a new carry of the same structure, "
            f"shapes and dtypes as the carry it receives. JAX says: {e}") from None
    degenerate_step = jnp.where(jnp.any(degenerate), jnp.argmax(degenerate), -1).astype(jnp.int32)
    broken_step = jnp.where(jnp.any(broken), jnp.argmax(broken), -1).astype(jnp.int32)
    if rejuvenation is not None:
        final = last[0]
        if light:
            final = light_history(final, model._split_retval(final.retval)[0])
        steps, ancestors, step_log_w = _rejuvenated_history(steps, final, ancestors, resampled, step_log_w)
    finished = None
    if light:
        steps, finished = steps
        is_batched = flags[1]
    else:
        is_batched = flags[0]
        if is_finished is not None:
            new_carries = model._split_retval(steps.retval)[0]
            finished = jax.vmap(jax.vmap(_finished))(new_carries)
    if rejuvenation is not None or is_finished is not None:
        is_batched = (True,) * len(jax.tree.leaves(steps))
    aux = (model, static, tuple(is_batched))
    result = ParticleFilterResult(steps, aux, dynamic, log_z, log_w, ess, ancestors, resampled,
                                  degenerate_step, step_log_w, finished)
    return result, (degenerate_step, broken_step)


# -- checks ----------------------------------------------------------------------------------


def _check_threshold(ess_threshold) -> float:
    try:
        value = float(ess_threshold)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ArgumentError(
            f"{_WHERE}: ess_threshold must be a number in [0, 1] known before the run (it decides the "
            f"compiled program), got {ess_threshold!r}.") from None
    if not 0.0 <= value <= 1.0:
        raise ArgumentError(
            f"{_WHERE}: ess_threshold must lie in [0, 1] (resample when ESS < ess_threshold * N; 1.0 "
            f"resamples at every step, 0.0 never), got {ess_threshold!r}.")
    return value


def _check_rejuvenation(rejuvenation, ess_threshold: float) -> None:
    from inference import Kernel

    if rejuvenation is None:
        return
    if not isinstance(rejuvenation, Kernel):
        raise ArgumentError(
            f"{_WHERE}: rejuvenation must be an inference.Kernel acting on a step's trace, e.g. "
            f"inference.mh('x') or inference.hmc(step_size=0.3, num_steps=5), got {type(rejuvenation).__name__}.")
    if ess_threshold == 0.0:
        raise ArgumentError(
            f"{_WHERE}: rejuvenation moves particles after a resampling, and ess_threshold=0.0 never "
            "resamples (weighted particles cannot be moved). Use an ess_threshold above 0.")


def _check_observations(observations: ChoiceMap, num_steps: int, model: ScanGF) -> None:
    for address, value in observations.flat_items():
        shape = jnp.shape(value)
        if not shape or shape[0] != num_steps:
            raise ObservationError(
                f"{_WHERE}: observation {format_address(address)} has shape {tuple(shape)}, but "
                f"{model.__name__} "
                f"runs {num_steps} steps: expected a leading axis of length {num_steps} (one value per step, "
                f"time first), e.g. {{'y': ys}} with ys.shape == ({num_steps}, ...). To observe some steps "
                "only, give every step and mask the missing ones in the kernel "
                "(dist.Normal(...).mask(is_observed)).")


def _check_proposed(proposed: ChoiceMap, obs: ChoiceMap, proposal) -> None:
    both = set(proposed.addresses()) & set(obs.addresses())
    if both:
        raise ArgumentError(
            f"{_WHERE}: the proposal {proposal.__name__} proposes "
            f"{', '.join(map(format_address, sorted(both)))}, "
            "which the observations constrain; a proposal covers a step's latent choices only.")


def _raise_if_degenerate(result: ParticleFilterResult, status) -> None:
    """Name the step (and site) where every weight died; reads one int on the host."""
    if not is_concrete(status):
        return  # under a user's jit: result.degenerate_step reports it
    t = int(status)
    if t < 0:
        return
    model, n = result.model, result.num_particles
    leaves, treedef = jax.tree.flatten(result._steps)
    step_trace = jax.tree.unflatten(treedef, [leaf[t] for leaf in leaves])
    if isinstance(step_trace, StepChoices):
        scores = [(a, np.asarray(s)) for a, s in step_trace.site_scores.items()]
    else:
        scores = [(a, np.asarray(s)) for a, s in model.kernel._site_scores(step_trace, ())]
    nan = [format_address(a) for a, s in scores if np.isnan(s).any()]
    posinf = [format_address(a) for a, s in scores if np.isposinf(s).any()]
    dead = [format_address(a) for a, s in scores if np.all(np.isneginf(s))]
    head = f"{_WHERE}: at step {t} (of {result.num_steps}, counting from 0)"
    if nan:
        raise InferenceError(f"{head} log weights are NaN; site(s) {', '.join(nan)} have NaN log density. "
                             "Check the model's parameters for invalid values (negative scales, log of "
                             "negatives).")
    if posinf:
        raise InferenceError(f"{head} log weights are +inf; site(s) {', '.join(posinf)} have log density "
                             "+inf "
                             "(a value on a pole of its density, or an infinite factor).")
    where = f" Site(s) {', '.join(dead)} have log density -inf in every particle." if dead else ""
    raise InferenceError(
        f"{head} all {n} particles have log weight -inf: none is possible under that step's "
        f"observations.{where} "
        "An observation may lie outside its distribution's support, or the proposal never reaches the region "
        "the observations allow. (Under jax.jit the filter returns log_marginal = -inf and "
        "result.degenerate_step instead of raising.)")


def _raise_if_unfinished(result: ParticleFilterResult, status) -> None:
    """A particle that `is_finished` called finished changed its weight or carry."""
    if not is_concrete(status) or int(status) < 0:
        return
    raise ArgumentError(
        f"{_WHERE}: at step {int(status)} (of {result.num_steps}, counting from 0) a particle that "
        "is_finished called finished before the step got a nonzero log weight increment or a different "
        "carry from it. is_finished promises that a finished particle's steps add nothing: wrap the step of "
        f"{result.model.kernel.__name__} in ppl.mask(...) with the flag `not done`, and return the old carry "
        "when done (jnp.where(done, carry, new_carry)).")


# -- helpers ---------------------------------------------------------------------------------


def _where(flag, a, b):
    return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


def _same_carry(new_carry, carry):
    """[N] bool: each particle's new carry equals its old one (PRNG key leaves not compared)."""
    same = jnp.ones(jax.tree.leaves(carry)[0].shape[:1], bool)
    for a, b in zip(jax.tree.leaves(new_carry), jax.tree.leaves(carry)):
        if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            continue
        equal = (a == b) | (jnp.isnan(a) & jnp.isnan(b)) if jnp.issubdtype(b.dtype, jnp.inexact) else a == b
        same = same & jnp.all(equal.reshape(equal.shape[0], -1), axis=1)
    return same


def _with_input(trace: Trace, x, n: int) -> Trace:
    """A stored batch of step traces with its input replaced by step x's (broadcast to N)."""
    if x is None:
        return trace
    carry, old = trace.args
    new = jax.tree.map(lambda o, v: jnp.broadcast_to(v, o.shape).astype(o.dtype), old, x)
    return Trace(trace.gen_fn, (carry, new), trace.retval, trace.score, trace.inner, trace._static)



def _strong(x):
    """`x` as an array without weak type (a Python float init carry would not match the kernel's)."""
    if isinstance(x, jax.Array) and not getattr(x, "weak_type", False):
        return x
    return jnp.asarray(x, dtype=jnp.asarray(x).dtype)


def _like_carry(new_carry, carry, model):
    """The kernel's new carry with a particle axis on every leaf (a leaf that depends on
    no particle comes out of the batch unbatched), checked against the carry it got."""
    if jax.tree.structure(new_carry) != jax.tree.structure(carry) or any(
            jnp.shape(a) != jnp.shape(b)[1:] and jnp.shape(a) != jnp.shape(b)
            for a, b in zip(jax.tree.leaves(new_carry), jax.tree.leaves(carry))):
        got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), new_carry)
        want = jax.tree.map(lambda b: jax.ShapeDtypeStruct(jnp.shape(b)[1:], b.dtype), carry)
        raise ArgumentError(
            f"{_WHERE}: the kernel {model.kernel.__name__} must return a new carry of the same structure, "
            f"shapes and dtypes as the carry it receives: got {got}, expected {want}.")
    return jax.tree.map(lambda a, b: jnp.broadcast_to(a, b.shape).astype(b.dtype), new_carry, carry)


def _broadcast_batch(tree, is_batched, n: int):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [
        leaf if b else jnp.broadcast_to(leaf, (n,) + jnp.shape(leaf)) for leaf, b in zip(leaves, is_batched)])


def _rejuvenated_history(moved, last, ancestors, resampled, step_log_w):
    """The stored history of a run with rejuvenation: step t's traces as the filter went on
    from them (moved at the resampling before step t + 1, indexed as after it), linked by
    the ancestors of the resampling that follows each step. Row t of `moved` is step
    t - 1's traces (row 0 a placeholder); `last` the last step's."""
    num_steps, n = ancestors.shape
    steps = jax.tree.map(lambda m, l: jnp.concatenate([m[1:], l[None]]), moved, last)
    identity = jnp.arange(n, dtype=ancestors.dtype)[None]
    links = jnp.concatenate([identity, ancestors[2:], identity]) if num_steps > 1 else identity
    uniform = jnp.full_like(step_log_w[:-1], -math.log(n))
    weights = jnp.concatenate([jnp.where(resampled[1:, None], uniform, step_log_w[:-1]), step_log_w[-1:]])
    return steps, links, weights


def _lineage(ancestors):
    """[T, N]: the index at step t of the path that ends in particle j at the last step."""
    last = jnp.arange(ancestors.shape[-1], dtype=ancestors.dtype)

    def back(current, a_t):
        return a_t[current], current

    _, indices = jax.lax.scan(back, last, ancestors, reverse=True)
    return indices


def _vmap_shared(fn, *batched):
    """`jax.vmap(fn)(*batched)` with outputs that depend on no batched input left unbatched.

    Returns `(outputs, is_batched)`, `is_batched` one flag per flat output leaf. As
    `inference`'s `vmap_particles`, with every argument batched (the particle index and
    the particle's carry): dependence is read off the jaxpr by a forward pass.
    """
    first = jax.tree.map(lambda leaf: leaf[0], batched)
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*first)
    treedef = jax.tree.structure(out_shape)
    depends = set(closed.jaxpr.invars)
    for eqn in closed.jaxpr.eqns:
        if any(not isinstance(v, Literal) and v in depends for v in eqn.invars):
            depends.update(eqn.outvars)
    is_batched = tuple(not isinstance(v, Literal) and v in depends for v in closed.jaxpr.outvars)
    out_axes = [0 if b else None for b in is_batched]
    leaves = jax.vmap(jaxpr_as_fun(closed), out_axes=out_axes)(*jax.tree.leaves(batched))
    return jax.tree.unflatten(treedef, leaves), is_batched
