"""One language-model call per step for a whole population: problems x particles as rows.

The methods run a batch of P problems as `jax.vmap` over problems of a particle filter
whose N particles are themselves a `jax.vmap`. `ppl.lm.LMStep` batches its particles
into one token loop (a `lax.while_loop` over N rows, finished rows masked inside the
body), but under a second `vmap` that loop is batched by JAX's generic rule: a loop per
problem predicate, which selects between the old and new KV caches of every row of every
problem at every token. `population_step(step)` is the same step (same model, rules,
draws and densities) whose sampler flattens every enclosing batch axis into rows, so a
step of the whole population is one loop over P * N rows: one batched forward pass of
the policy per token for every particle of every problem.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ppl import ParticleKey
from ppl._keys import as_jax_key
from ppl.lm import LMStep
from ppl.lm._step import _sample_rows

__all__ = ["population_step", "PopulationStep"]


class PopulationStep(LMStep):
    """An `LMStep` whose `sample` batches under any number of `jax.vmap`s as one set of rows.

    Same fields, choices, densities and draws as the `LMStep` it is built from (a row
    draws its tokens from its own key, whatever the batch), so a method run with it
    gives the same particles as with the plain step.
    """

    def sample(self, key, state):
        """Draw one step for one row: `(new_state, tokens [max_step_len], log_prob)`."""
        key = as_jax_key(key) if isinstance(key, ParticleKey) else key
        return _sample(self.model, key, state, self._rules())


@functools.lru_cache(maxsize=None)
def population_step(step: LMStep) -> PopulationStep:
    """`step` as a `PopulationStep` (cached: the same step gives the same object, so
    models built on it and the programs compiled for them are shared).

    >>> from smc.llm import builtin
    >>> b = builtin()
    >>> s = population_step(b.step)
    >>> (s.model is b.step.model, s.max_step_len, s.sampler == b.step.sampler)
    (True, 10, True)
    """
    if isinstance(step, PopulationStep):
        return step
    return PopulationStep(step.model, step.max_step_len, step.stop_tokens, step.eos_tokens, step.sampler)


# Jitted, so that the arrays the loop builds stay inside the call: a custom_vmap function
# that closed over them would receive them as operands, which a `lax.cond` turned into a
# select under `vmap` batches, and custom_vmap refuses batched closed-over values.
@functools.partial(jax.jit, static_argnums=3)
def _sample(model, key, state, rules):
    return _population_sampler(rules)(model, key, state)


@functools.lru_cache(maxsize=None)
def _population_sampler(rules):
    """The one-row sampler for `rules`: under `jax.vmap` (nested or not) every batch axis
    becomes rows of one `_sample_rows` call. The model must be shared by the rows (not
    batched); a batched model falls back to JAX's rule for the loop."""
    loop = jax.jit(functools.partial(_sample_rows, rules=rules, model_axes=None, key_axis=0))

    @jax.custom_batching.custom_vmap
    def rows(model, keys, states):
        return loop(model, keys, states)

    @rows.def_vmap
    def flattened(axis_size, in_batched, model, keys, states):
        # The rows of every batch member, [B, R, ...] -> [B * R, ...], in one call (of
        # `rows` again, so an enclosing vmap flattens its axis into the same loop).
        model_batched, keys_batched, states_batched = in_batched
        if any(jax.tree.leaves(model_batched)):
            return _plain_vmap(axis_size, in_batched, loop, model, keys, states, is_row=False)
        keys, states = _broadcast(axis_size, keys, keys_batched), _broadcast_tree(axis_size, states, states_batched)
        count = keys.shape[1]
        out = rows(model, _merge(keys), jax.tree.map(_merge, states))
        out = jax.tree.map(lambda x: x.reshape((axis_size, count) + x.shape[1:]), out)
        return out, jax.tree.map(lambda _: True, out)

    @jax.custom_batching.custom_vmap
    def one_row(model, key, state):
        out = rows(model, key[None], jax.tree.map(lambda x: x[None], state))
        return jax.tree.map(lambda x: x[0], out)

    @one_row.def_vmap
    def batch(axis_size, in_batched, model, key, state):
        model_batched, key_batched, state_batched = in_batched
        if any(jax.tree.leaves(model_batched)):
            return _plain_vmap(axis_size, in_batched, loop, model, key, state, is_row=True)
        out = rows(model, _broadcast(axis_size, key, key_batched), _broadcast_tree(axis_size, state, state_batched))
        return out, jax.tree.map(lambda _: True, out)

    return one_row


def _plain_vmap(axis_size, in_batched, loop, model, keys, states, is_row):
    """JAX's own batching of the row loop (a batch of models: each keeps its own rows).
    `is_row`: the arguments are one row (a key and a state) rather than rows."""
    model_batched, keys_batched, states_batched = in_batched
    in_axes = (jax.tree.map(lambda b: 0 if b else None, model_batched), 0 if keys_batched else None,
               jax.tree.map(lambda b: 0 if b else None, states_batched))

    def one(m, k, s):
        if is_row:
            return jax.tree.map(lambda x: x[0], loop(m, k[None], jax.tree.map(lambda x: x[None], s)))
        return loop(m, k, s)

    out = jax.vmap(one, in_axes=in_axes, axis_size=axis_size)(model, keys, states)
    return out, jax.tree.map(lambda _: True, out)


def _broadcast(axis_size, x, is_batched):
    return x if is_batched else jnp.broadcast_to(x, (axis_size,) + x.shape)


def _broadcast_tree(axis_size, tree, is_batched):
    return jax.tree.map(lambda x, b: _broadcast(axis_size, x, b), tree, is_batched)


def _merge(x):
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
