"""Importance sampling and sampling-importance-resampling, on the GFI only.

With the prior as proposal each particle is `model.generate(key_i, constraints, args)`
and its log weight is log p(constraints, factors | latents_i). With a proposal
generative function `q`, the latents come from `q.simulate` and the weight is
`generate`'s weight minus `q`'s score. `log_marginal = logsumexp(w) - log N` is an
unbiased estimate of the evidence p(constraints) on the natural scale.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from ppl import ArgumentError, ChoiceMap, GenerativeFunction, InferenceError, ObservationError, Trace, particle_key
from ppl.extend import check_args, check_key, combine, format_address, is_concrete, partition, vmap_shared

from ._checks import check_constraint_values
from ._sharding import shard_leading_axis

__all__ = ["importance", "ImportanceResult", "log_ess"]


def log_ess(log_weights: jax.Array) -> jax.Array:
    """Log effective sample size (sum w)^2 / sum w^2 of unnormalized log weights."""
    return 2.0 * logsumexp(log_weights) - logsumexp(2.0 * log_weights)


@jax.tree_util.register_pytree_node_class
class ImportanceResult:
    """Particles of an importance sampler.

    Fields:
      log_weights:   [num_particles] unnormalized log importance weights.
      log_marginal:  [] log of the unbiased evidence estimate mean(exp(log_weights)).
      ess:           [] effective sample size, in [1, num_particles].
      traces:        the particles, a batch of `Trace`s with leading axis num_particles.

    Leaves that are the same for every particle (observations, arguments) are stored
    once; `traces` broadcasts them on access. `resample(key, n)` draws `n` traces with
    probability proportional to the weights (sampling-importance-resampling).
    """

    def __init__(self, packed: Trace, is_batched: tuple, log_weights, log_marginal, ess):
        self._packed = packed
        self._is_batched = is_batched
        self.log_weights = log_weights
        self.log_marginal = log_marginal
        self.ess = ess

    @property
    def num_particles(self) -> int:
        return self.log_weights.shape[-1]

    def _expand(self, take, n: int) -> Trace:
        """The packed traces with `take` applied to batched leaves, shared leaves
        broadcast to the `n` traces `take` yields."""
        leaves, treedef = jax.tree.flatten(self._packed)
        out = [take(leaf) if batched else leaf for leaf, batched in zip(leaves, self._is_batched)]
        out = [
            leaf if batched else jnp.broadcast_to(leaf, (n,) + jnp.shape(leaf))
            for leaf, batched in zip(out, self._is_batched)
        ]
        return jax.tree.unflatten(treedef, out)

    @property
    def traces(self) -> Trace:
        """All particles, leaves with leading axis `num_particles`."""
        return self._expand(lambda x: x, self.num_particles)

    def normalized_weights(self) -> jax.Array:
        """[num_particles] weights summing to one."""
        return jax.nn.softmax(self.log_weights)

    def resample(self, key, n: int | None = None) -> Trace:
        """`n` (default num_particles) traces drawn i.i.d. with probability ∝ weight.

        Multinomial resampling: as n grows the draws approach the posterior when the
        proposal covers it (sampling-importance-resampling).
        """
        n = self.num_particles if n is None else n
        ancestors = jax.random.categorical(key, self.log_weights, shape=(n,))
        return self._expand(lambda x: x[ancestors], n)

    def __repr__(self):
        return (
            f"ImportanceResult(num_particles={self.num_particles}, "
            f"log_marginal={self.log_marginal}, ess={self.ess})"
        )

    def tree_flatten(self):
        children = (self._packed, self.log_weights, self.log_marginal, self.ess)
        return children, self._is_batched

    @classmethod
    def tree_unflatten(cls, is_batched, children):
        packed, log_weights, log_marginal, ess = children
        return cls(packed, is_batched, log_weights, log_marginal, ess)


def importance(
    key,
    model: GenerativeFunction,
    args: tuple,
    constraints,
    num_particles: int,
    *,
    proposal: GenerativeFunction | None = None,
    proposal_args: tuple = (),
) -> ImportanceResult:
    """Importance sampling of `model(*args)` given `constraints`, one jit-compiled batch.

    Args:
      key: a `jax.random` key.
      model: the generative function.
      args: its argument tuple.
      constraints: observed values, a `ChoiceMap` or nested dict.
      num_particles: N, a static int.
      proposal: optional generative function whose choices propose the model's latent
        choices; called as `proposal.simulate(key, proposal_args)`.

    Returns an `ImportanceResult` (log_weights [N], log_marginal [], ess [], traces,
    resample). With several devices and N divisible by their number, the particles are
    sharded across `jax.devices()`. Particle `i` runs with `ppl.particle_key(key, i)`,
    so a draw costs one hash per value, as batched hand-written code.

    Raises `InferenceError` naming the site if every weight is -inf, if a weight is
    +inf (a constraint at a density pole, an infinite factor) or NaN. These checks
    read the weights on the host, so they run only when `importance` is called outside
    `jax.jit`; under a user's `jit` the result is returned as computed and the caller
    checks `log_marginal` (finite unless the run is degenerate).

    >>> import numpyro.distributions as dist, ppl
    >>> @ppl.gen
    ... def model():
    ...     mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    ...     return ppl.sample("y", dist.Normal(mu, 1.0))
    >>> res = importance(jax.random.key(0), model, (), {"y": 1.0}, 1000)
    >>> res.log_weights.shape, res.traces["mu"].shape
    ((1000,), (1000,))
    """
    if not isinstance(model, GenerativeFunction):
        raise ArgumentError(
            f"importance: model must be a generative function (decorate it with @ppl.gen), "
            f"got {type(model).__name__}."
        )
    key = check_key(key, model, "inference.importance")
    args = check_args(args, model, "inference.importance")
    if not isinstance(num_particles, (int, np.integer)) or isinstance(num_particles, bool) or num_particles < 1:
        raise ArgumentError(f"importance: num_particles must be a positive int, got {num_particles!r}.")
    if proposal is not None:
        if not isinstance(proposal, GenerativeFunction):
            raise ArgumentError(f"importance: proposal must be a generative function, got {type(proposal).__name__}.")
        proposal_args = check_args(proposal_args, proposal, "inference.importance (proposal_args)")
    constraints = ChoiceMap.of(constraints)
    check_constraint_values(model, args, constraints, "inference.importance")
    dynamic, static = partition((args, proposal_args))
    result, status = _importance(
        key, dynamic, constraints,
        static=static, model=model, num_particles=int(num_particles), proposal=proposal,
    )
    _raise_if_degenerate(result, status, constraints, model)
    return result


@functools.partial(jax.jit, static_argnames=("static", "model", "num_particles", "proposal"))
def _importance(key, dynamic, constraints, *, static, model, num_particles, proposal):
    args, proposal_args = combine(dynamic, static)

    k_model, k_proposal = jax.random.split(key)

    def particle(i):
        if proposal is None:
            return model.generate(particle_key(k_model, i), constraints, args)
        q = proposal.simulate(particle_key(k_proposal, i), proposal_args)
        both = set(q.choices.addresses()) & set(constraints.addresses())
        if both:
            raise ArgumentError(
                f"importance: the proposal {proposal.__name__} proposes "
                f"{', '.join(map(format_address, sorted(both)))}, which the constraints observe; "
                "a proposal covers latent choices only."
            )
        tr, w = model.generate(particle_key(k_model, i), constraints.merge(q.choices), args)
        return tr, w - q.score

    indices = shard_leading_axis(jnp.arange(num_particles, dtype=jnp.uint32))
    (traces, log_weights), is_batched = vmap_shared(particle, indices)
    log_weights = jnp.broadcast_to(log_weights, (num_particles,))
    log_marginal = logsumexp(log_weights) - math.log(num_particles)
    ess = jnp.exp(log_ess(log_weights))
    result = ImportanceResult(traces, is_batched[:-1], log_weights, log_marginal, ess)
    # One small flag vector, so the driver can raise without copying data to the host:
    # [any weight NaN or +inf, every weight -inf, constraint 0 finite, constraint 1 finite, ...].
    status = jnp.stack(
        [jnp.any(jnp.isnan(log_weights) | jnp.isposinf(log_weights)), jnp.all(jnp.isneginf(log_weights))]
        + [_all_finite(v) for _, v in constraints.flat_items()]
    )
    return result, status


def _all_finite(value) -> jax.Array:
    value = jnp.asarray(value)
    return jnp.all(jnp.isfinite(value)) if jnp.issubdtype(value.dtype, jnp.inexact) else jnp.asarray(True)


def _raise_if_degenerate(result, status, constraints: ChoiceMap, model) -> None:
    """Name the bad observation or site instead of returning NaN (one small host copy)."""
    if not is_concrete(status):
        return  # inside a user's jit: the caller sees the weights
    any_bad, all_neginf, *constraint_is_finite = np.asarray(status).tolist()
    for address, ok in zip(constraints.addresses(), constraint_is_finite):
        if not ok:
            raise ObservationError(
                f"inference.importance: constraint {format_address(address)} has non-finite values. "
                "Remove or impute them, or mask the missing entries in the model."
            )
    if any_bad or all_neginf:
        _check_weights(result, model)


def _check_weights(result: ImportanceResult, model: GenerativeFunction) -> None:
    """Name the culprit site when the run is degenerate, instead of returning NaN."""
    log_weights = result.log_weights
    if not is_concrete(log_weights):
        return
    host = np.asarray(log_weights)
    has_nan, has_posinf = bool(np.isnan(host).any()), bool(np.isposinf(host).any())
    if not has_nan and not has_posinf and not np.all(np.isneginf(host)):
        return

    def bad(s):
        if has_nan:
            return np.isnan(s).any()
        if has_posinf:
            return np.isposinf(s).any()
        return np.all(np.isneginf(s))

    culprits = [format_address(a) for a, score in model._site_scores(result._packed, ()) if bad(np.asarray(score))]
    named = ", ".join(culprits)
    if has_nan:
        where = f" Site(s) {named} are NaN." if culprits else ""
        raise InferenceError(
            f"inference.importance: {int(np.isnan(host).sum())} of {host.size} log weights are NaN.{where} "
            "Check the model's parameters for invalid values (negative scales, log of negatives)."
        )
    if has_posinf:
        where = f" Site(s) {named} have log density +inf." if culprits else ""
        raise InferenceError(
            f"inference.importance: {int(np.isposinf(host).sum())} of {host.size} log weights are +inf, "
            f"so the normalized weights are undefined.{where} A constraint may sit on a pole of its "
            "density (e.g. Beta(a, a) with a < 1 at 0 or 1), or a factor is infinite."
        )
    where = f" Site(s) {named} have log density -inf in every particle." if culprits else ""
    raise InferenceError(
        f"inference.importance: all {host.size} log weights are -inf: no particle is possible under the "
        f"constraints.{where} An observation may lie outside its distribution's support, or the "
        "proposal never reaches the region the constraints allow."
    )
