"""`vi.stateful_grad`: `vi.grad` with the state that moving-average baselines carry.

A reinforce site with `baseline="moving_average"` subtracts an average of the
objective's values at past optimization steps. `vi.grad` is a pure function of
`(key, params)` with no past, so the average is explicit state, as in optax: an
`(init, step)` pair. `init(key, params)` gives one `MovingAverage` per such site;
`step(key, params, state)` estimates the gradient with the baselines the state holds
and returns the state updated with this step's value. The baseline of step t is built
from steps before t only, so it does not depend on step t's draws and the estimate
stays unbiased. `vi.fit` threads the state through its scan and its checkpoints.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

import ppl
from ppl.extend import partition

from ._grad import discover, value_and_grad_with_baselines

__all__ = ["stateful_grad", "StatefulGrad", "MovingAverage"]


class MovingAverage(NamedTuple):
    """One site's moving average of the objective's value (a pytree of scalars).

    `average`: `m_t = decay * m_{t-1} + (1 - decay) * f_{t-1}`, `m_0 = 0`, float `[]`;
    `steps`: t, int32 `[]`. The baseline is the debiased `m_t / (1 - decay^t)` (0 at t = 0).
    """

    average: jax.Array
    steps: jax.Array


class StatefulGrad(NamedTuple):
    """`init(key, params) -> state` and `step(key, params, state) -> (value, grads, state)`.

    `state` is a dict `{site label: MovingAverage}`, one entry per reinforce site with
    `baseline="moving_average"` (empty when there is none); the label is
    `"<construct call number>:<site path>"`.
    """

    init: Callable
    step: Callable


def stateful_grad(objective, num_samples: int = 1) -> StatefulGrad:
    """`vi.grad(objective, num_samples)` with moving-average baselines kept as state.

    `step(key, params, state)` returns `(value, grads, new_state)`: `value` and `grads`
    are `vi.grad`'s unbiased estimates, each moving-average site's baseline read from
    `state` (steps before this one); `new_state` adds this step's value to each average.
    Pure functions: jit, scan and checkpoint the state like an optimizer's. `init`
    traces the objective (shapes only) once per signature of `(key, params)`: tree
    structure, non-array leaves, and the arrays' shapes and dtypes.

    >>> import jax, numpyro.distributions as dist, ppl, vi
    >>> @ppl.gen
    ... def guide(logit):
    ...     return ppl.sample("b", vi.reinforce(dist.Bernoulli(logits=logit), baseline="moving_average"))
    >>> objective = lambda key, logit: 10.0 + vi.simulate(guide, key, (logit,))["b"]
    >>> grad_fn = vi.stateful_grad(objective)
    >>> state = grad_fn.init(jax.random.key(0), 0.3)
    >>> sorted(state)
    ['0:b']
    >>> value, grads, state = grad_fn.step(jax.random.key(1), 0.3, state)
    >>> int(state["0:b"].steps)
    1
    """
    estimate = value_and_grad_with_baselines(objective, num_samples)
    labels_of: dict = {}  # signature of (key, params) -> sorted moving-average labels

    def init(key, params):
        # Finding the sites traces the whole objective (tens of ms for a VAE), and
        # `vi.fit` calls init on every call: a repeated fit of 200 fast steps spent a
        # quarter of its time here. The sites are static, fixed by what a jitted step sees
        # (params' structure, static leaves and array shapes), so they are kept per
        # signature, as jit keeps its programs.
        signature = _signature(key, params)
        labels = labels_of.get(signature) if signature is not None else None
        if labels is None:
            labels = tuple(sorted(discover(objective, key, params)[2]))  # traces, shapes only
            if signature is not None:
                if len(labels_of) >= _MAX_SIGNATURES:
                    labels_of.pop(next(iter(labels_of)))
                labels_of[signature] = labels
        return {label: MovingAverage(jnp.zeros(()), jnp.zeros((), jnp.int32)) for label in labels}

    def step(key, params, state):
        def baselines(averaged):
            _check_state(state, averaged)
            return {label: _debiased(state[label], decay) for label, decay in averaged.items()}

        value, grads, averaged = estimate(key, params, baselines)
        f = jax.lax.stop_gradient(value)
        new_state = {
            label: MovingAverage(
                decay * state[label].average + (1.0 - decay) * f.astype(state[label].average.dtype),
                state[label].steps + 1,
            )
            for label, decay in averaged.items()
        }
        return value, grads, new_state

    return StatefulGrad(init, step)


_MAX_SIGNATURES = 64


def _signature(key, params):
    """What fixes the objective's sites under jit: the static part of `(key, params)`
    (tree structure and non-array leaves) and the arrays' shapes and dtypes; None when a
    static leaf is not hashable (then nothing is cached)."""
    dynamic, static = partition((key, params))
    signature = (static, tuple((jnp.shape(x), getattr(x, "dtype", type(x))) for x in dynamic))
    try:
        hash(signature)
    except TypeError:
        return None
    return signature


def _debiased(average: MovingAverage, decay: float) -> jax.Array:
    correction = 1.0 - jnp.power(decay, average.steps.astype(average.average.dtype))
    return jnp.where(average.steps > 0, average.average / jnp.where(average.steps > 0, correction, 1.0), 0.0)


def _check_state(state, averaged):
    if not isinstance(state, dict) or set(state) != set(averaged) or not all(
        isinstance(v, MovingAverage) for v in state.values()
    ):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ppl.ArgumentError(
            f"vi.stateful_grad: the state holds {have}, but the objective's moving-average "
            f"sites are {sorted(averaged)}. Start it with init(key, params) of the same objective."
        )
