"""Enumeration Gibbs for discrete sites with finite support, and the `mixture` of kernels.

`gibbs(address)` redraws a discrete choice from its exact conditional given everything
else in the trace. For each value `v` of the site's support (numpyro's
`enumerate_support`), `model.update(key, trace, {address: v}, args)` gives the weight
`log p(trace with v) - log p(trace)`; the conditional is the softmax of those weights,
computed for all `K` values at once (`jax.vmap` over the support). A site holding an
array of discrete values (a `Categorical` with batch shape `[n]`) is swept one element
at a time, each element from its conditional given the others, in a `lax.scan`: a sweep
costs `n * K` evaluations of the model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import ppl
from ppl.extend import format_address

from ._kernels import Kernel, MHState, _check_not_observed, _check_trace, _replace_trace

__all__ = ["gibbs", "GibbsInfo", "mixture", "MixtureState"]


class GibbsInfo(NamedTuple):
    """`log_probs`: `[n, K]` log conditional probabilities of the support values used for
    each element of the site (`n` = 1 for a scalar site)."""

    log_probs: jax.Array


class _Support(ppl.SiteHandler):
    """Reads the support of the site at `path` while a model runs."""

    def __init__(self, path: tuple):
        self.path = path
        self.support = None

    def process(self, site):
        if site.path == self.path:
            d = site.fn
            if site.kind != "latent" or not getattr(d, "has_enumerate_support", False):
                what = "is not a latent site" if site.kind != "latent" else (
                    f"has a {type(d).__name__} distribution, whose support is not finite"
                )
                raise ppl.ArgumentError(
                    f"inference.gibbs: site {format_address(self.path)} {what}. Enumeration Gibbs "
                    "needs a latent discrete site with finite support (Bernoulli, Categorical, "
                    "DiscreteUniform, Binomial with a fixed total_count, ...); use inference.mh "
                    "for other sites."
                )
            try:
                with jax.ensure_compile_time_eval():
                    values = np.asarray(d.enumerate_support(expand=False))
            except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
                raise ppl.ArgumentError(
                    f"inference.gibbs: the support of site {format_address(self.path)} "
                    f"({type(d).__name__}) depends on other random values, so its size is not "
                    "known when the kernel is compiled. Give it a fixed support (e.g. a constant "
                    "total_count), or use inference.mh."
                ) from None
            self.support = values.reshape(values.shape[0], -1)[:, 0]
        return site


def _support_of(trace, path: tuple) -> np.ndarray:
    reader = _Support(path)
    jax.eval_shape(lambda t: ppl.handle(t.gen_fn, reader).assess(t.choices, t.args), trace)
    if reader.support is None:
        raise ppl.ArgumentError(
            f"inference.gibbs: {trace.gen_fn.__name__} has no random choice at {format_address(path)}."
        )
    return reader.support


def gibbs(address) -> Kernel:
    """Enumeration Gibbs: the discrete choice at `address` redrawn from its exact
    conditional given all other choices and the observations.

    The support comes from the site's distribution (`enumerate_support`) and must have a
    size known when the model is traced (K values). A scalar site costs K model updates
    per step, vectorized over the support. A site with `n` elements is swept element by
    element, each from its conditional given the others, at a cost of `n * K` updates.
    Sites inside `ppl.vmap` or `ppl.scan` are among the latter (address them by their full
    path, e.g. `("points", "z")`).

    Compose it with gradient kernels for the continuous sites:
    `cycle(gibbs("z"), nuts(selection="mu"))`.

    >>> import numpyro.distributions as dist
    >>> @ppl.gen
    ... def model():
    ...     k = ppl.sample("k", dist.Bernoulli(0.5))
    ...     return ppl.sample("y", dist.Normal(3.0 * k, 1.0))
    >>> trace, _ = model.generate(jax.random.key(0), {"y": 3.0}, ())
    >>> kernel = inference.gibbs("k")
    >>> state, info = kernel.step(jax.random.key(1), kernel.init(trace, observed={"y": 3.0}))
    >>> info.log_probs.shape  # [elements, support size]
    (1, 2)
    """
    if isinstance(address, str):
        path = (address,)
    elif isinstance(address, tuple) and address and all(isinstance(a, str) for a in address):
        path = address
    else:
        raise ppl.ArgumentError(
            f"inference.gibbs takes one address (a string or a tuple path), got {address!r}; "
            "cycle one gibbs kernel per site."
        )

    def init(trace, *, observed=None, num_warmup=0):
        _check_trace(trace, "gibbs")
        _check_not_observed([path], observed, "inference.gibbs")
        _support_of(trace, path)  # the errors, at init
        return MHState(trace)

    def step(key, state):
        trace = state.trace
        support = _support_of(trace, path)
        current = trace[path]
        shape, dtype = jnp.shape(current), jnp.asarray(current).dtype
        values = jnp.asarray(support, dtype)
        size = int(np.prod(shape, dtype=int))

        def one_element(tr, key_i):
            k_update, k_draw = jax.random.split(key_i[0])
            i = key_i[1]
            flat = jnp.reshape(tr[path], (-1,))

            def with_value(v):
                moved = jnp.reshape(flat.at[i].set(v), shape)
                new, w, _ = tr.gen_fn.update(k_update, tr, ppl.ChoiceMap({path: moved}), tr.args)
                return new, w

            candidates, log_w = jax.vmap(with_value)(values)
            log_probs = jax.nn.log_softmax(log_w)
            chosen = jax.random.categorical(k_draw, log_w)
            new = jax.tree.map(lambda leaf: leaf[chosen], candidates)
            return new, log_probs

        keys = jax.random.split(key, size)
        trace, log_probs = jax.lax.scan(one_element, trace, (keys, jnp.arange(size)))
        return MHState(trace), GibbsInfo(log_probs)

    return Kernel(init, step, _replace_trace)


class MixtureState(NamedTuple):
    """State of `mixture`: one state per kernel, all at the same trace (`trace`)."""

    states: tuple

    @property
    def trace(self) -> ppl.Trace:
        return self.states[0].trace


def mixture(kernels, probs) -> Kernel:
    """A random choice of kernel per step: kernel `i` with probability `probs[i]`.

    Each kernel leaves the target invariant, so the mixture does. One step runs only the
    chosen kernel (`lax.switch`; under `vmap` over chains every kernel runs and one
    result is kept), then brings the other kernels' states to the new trace. The info is
    `(index, infos)`, with zeros in the infos of the kernels not chosen.
    """
    kernels = tuple(kernels)
    if not kernels or not all(isinstance(k, Kernel) for k in kernels):
        raise ppl.ArgumentError("inference.mixture expects a list of kernels and a list of probabilities.")
    p = np.asarray(probs, dtype=float)
    if p.shape != (len(kernels),) or np.any(p < 0) or not np.isclose(p.sum(), 1.0):
        raise ppl.ArgumentError(
            f"inference.mixture: probs must be {len(kernels)} non-negative numbers summing to 1, got {probs!r}."
        )
    log_p = jnp.log(jnp.asarray(p, jnp.float32))

    def init(trace, *, observed=None, num_warmup=0):
        return MixtureState(tuple(k.init(trace, observed=observed, num_warmup=num_warmup) for k in kernels))

    def step(key, state):
        k_pick, k_step = jax.random.split(key)
        index = jax.random.categorical(k_pick, log_p)
        info_shapes = [jax.eval_shape(k.step, k_step, s)[1] for k, s in zip(kernels, state.states)]

        def branch(i):
            def run(states):
                sub, info = kernels[i].step(k_step, states[i])
                new = tuple(sub if j == i else k.refresh(s, sub.trace) for j, (k, s) in enumerate(zip(kernels, states)))
                infos = tuple(
                    info if j == i else jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shape)
                    for j, shape in enumerate(info_shapes)
                )
                return new, infos

            return run

        states, infos = jax.lax.switch(index, [branch(i) for i in range(len(kernels))], state.states)
        return MixtureState(states), (index, infos)

    def refresh(state, trace):
        return MixtureState(tuple(k.refresh(s, trace) for k, s in zip(kernels, state.states)))

    return Kernel(init, step, refresh)
