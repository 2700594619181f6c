"""Backward-simulation smoothing (FFBS) from a particle filter's stored particles.

`backward_simulation` draws whole trajectories from the smoothing distribution
p(x_{1:T} | y_{1:T}) given a forward `particle_filter` run (Godsill, Doucet & West,
"Monte Carlo smoothing for nonlinear time series", JASA 2004): the last state from the
final weights, then each earlier state from the filter's particles at that step with
weights w_t^i p(x_{t+1}, y_{t+1} | carry_t^i), the kernel's density (`assess`) of the
already drawn next step at each particle's carry. Unlike `paths()`, which follows the
genealogy and collapses to a few distinct early states, it reuses all N particles of
every step. One `lax.scan` backwards over the steps, samples and particles vmapped:
O(M N T) kernel evaluations for M trajectories.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ppl import ArgumentError, InferenceError, Trace
from ppl.extend import check_key, is_concrete

from ._csmc import _comparable
from ._filter import ParticleFilterResult

__all__ = ["backward_simulation"]

_WHERE = "smc.backward_simulation"


def backward_simulation(key, result: ParticleFilterResult, num_samples: int) -> Trace:
    """Forward filtering, backward simulation: `num_samples` smoothed trajectories.

    From a `particle_filter` result over T steps with N particles: the last state is
    drawn from the final weights; for t = T-2, ..., 0 the state at t is drawn from the
    step-t particles with probability proportional to w_t^i p(x_{t+1}, y_{t+1} |
    carry_t^i), w_t the step's filtering weights (`result.step_log_weights`) and the
    density that of the kernel's step t+1 choices (latent and observed) at particle
    i's new carry. The trajectories are draws from the particle approximation of the
    smoothing distribution, independent given the filter run.

    Requires a Markov model: a step's new carry must be determined by the step's own
    choices and input (carry = the state), so that choosing another parent does not
    change the rest of the path. Called eagerly, a kernel whose new carry also depends
    on the previous carry raises `InferenceError`.

    Args:
      key: a `jax.random` key.
      result: a `ParticleFilterResult` from `smc.particle_filter`.
      num_samples: M, the number of trajectories, a static int.

    Returns a batch of M traces of the scan model: choices [M, T, ...], `score` [M]
    (the log joint of each trajectory), args broadcast to [M, ...]. Jittable (under
    `jax.jit` the Markov check is skipped).

    >>> import numpyro.distributions as dist, ppl, smc
    >>> @ppl.gen
    ... def step(x, _):
    ...     x = ppl.sample("x", dist.Normal(0.9 * x, 1.0))
    ...     ppl.sample("y", dist.Normal(x, 0.5))
    ...     return x, None
    >>> model = ppl.scan(step, length=10)
    >>> res = smc.particle_filter(jax.random.key(0), model, (0.0, None), {"y": jnp.zeros(10)}, 100)
    >>> backward_simulation(jax.random.key(1), res, 5)["x"].shape
    (5, 10)
    """
    if not isinstance(result, ParticleFilterResult):
        raise ArgumentError(
            f"{_WHERE}: expected the ParticleFilterResult of smc.particle_filter, got {type(result).__name__}.")
    key = check_key(key, result.model, _WHERE)
    is_int = isinstance(num_samples, (int, np.integer)) and not isinstance(num_samples, bool)
    if not is_int or num_samples < 1:
        raise ArgumentError(f"{_WHERE}: num_samples must be a positive int, got {num_samples!r}.")
    if result.step_log_weights is None:
        raise ArgumentError(f"{_WHERE}: the result holds no per-step weights; run smc.particle_filter again.")
    trajectories, mismatch = _backward(key, result, num_samples=int(num_samples))
    if is_concrete(mismatch) and int(mismatch) >= 0:
        raise InferenceError(
            f"{_WHERE}: at step {int(mismatch)} the kernel {result.model.kernel.__name__} returns a new carry that "
            "depends on the previous carry, not only on the step's choices and input, so a trajectory's future "
            "would change with the parent drawn for it and the backward weights would be wrong. Make the carry "
            "the state itself (sample the state, not an increment), or use result.paths().")
    return trajectories


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _backward(key, result: ParticleFilterResult, *, num_samples):
    model, args = result.model, result.args
    kernel = model.kernel
    init_carry, xs = args
    num_steps, n = result.num_steps, result.num_particles
    steps = _batched_steps(result)  # step traces, every leaf [T, N, ...]
    log_w = result.step_log_weights  # [T, N]
    k_last, k_back = jax.random.split(key)
    last = jax.random.categorical(k_last, log_w[-1], shape=(num_samples,)).astype(jnp.int32)

    def back(index, t):
        """Draw the indices at step t given the drawn indices `index` [M] at t + 1."""
        following = jax.tree.map(lambda leaf: leaf[t + 1, index], steps)  # M step traces
        x = jax.tree.map(lambda leaf: leaf[t + 1], xs)
        carries = jax.tree.map(lambda leaf: leaf[t], steps.retval[0])  # [N, ...]: the new carries of step t

        def one(step_trace, k):
            choices = step_trace.choices

            def transition(c):
                lp, retval = kernel.assess(choices, (c, x))
                return lp, retval[0]

            lp, new_carry = jax.vmap(transition)(carries)
            logits = log_w[t] + lp
            is_possible = logits > -jnp.inf
            has_any = jnp.any(is_possible)
            i = jax.random.categorical(k, jnp.where(has_any, logits, 0.0))
            same = [jnp.all((_comparable(a) == _comparable(b)[None]).reshape(n, -1), axis=1)
                    for a, b in zip(jax.tree.leaves(new_carry), jax.tree.leaves(step_trace.retval[0]))]
            mismatch = jnp.any(is_possible & ~jnp.all(jnp.stack(same), axis=0)) if same else jnp.zeros((), bool)
            return jnp.where(has_any, i, 0).astype(jnp.int32), mismatch

        keys = jax.random.split(jax.random.fold_in(k_back, t), num_samples)
        index, mismatch = jax.vmap(one)(following, keys)
        return index, (index, jnp.any(mismatch))

    _, (indices, mismatch) = jax.lax.scan(back, last, jnp.arange(num_steps - 1), reverse=True)
    indices = jnp.concatenate([indices, last[None]])  # [T, M]
    chosen = jax.tree.map(lambda leaf: jnp.moveaxis(leaf[jnp.arange(num_steps)[:, None], indices], 0, 1), steps)
    choices = jax.vmap(lambda tr: tr.choices)(chosen)  # [M, T, ...]

    def rebuild(c):
        # The drawn steps came from other parents than their stored ones: re-run the scan
        # with every choice given, so the trace's carries, scores and args agree.
        return model.generate(jax.random.key(0), c, args)[0]

    trajectories = jax.vmap(rebuild)(choices)
    first = jnp.where(jnp.any(mismatch), jnp.argmax(mismatch) + 1, -1).astype(jnp.int32)  # the step drawn for
    return trajectories, first


def _batched_steps(result: ParticleFilterResult):
    """The filter's step traces with a particle axis on every leaf: [T, N, ...]."""
    n = result.num_particles
    leaves, treedef = jax.tree.flatten(result._steps)
    is_batched = result._aux[2]
    out = [leaf if batched else jnp.broadcast_to(leaf[:, None], leaf.shape[:1] + (n,) + leaf.shape[1:])
           for leaf, batched in zip(leaves, is_batched)]
    return jax.tree.unflatten(treedef, out)
