"""MCMC kernels over traces: the `Kernel` pair, Metropolis-Hastings moves, and `cycle`.

A kernel is a pair of pure functions over a state pytree that holds the current trace
(`state.trace`), so kernels written against the GFI compose:

    state = kernel.init(trace, observed=constraints, num_warmup=0)
    state, info = kernel.step(key, state)          # one transition
    state = kernel.refresh(state, moved_trace)     # another kernel moved the trace

Both are jit- and vmap-able (a batch of chains is `jax.vmap(kernel.step)(keys, states)`)
and contain no Python loop over chains or steps. `init` takes no key: it only reads the
trace. `observed` names the constrained addresses (a kernel never moves them);
`num_warmup` (a static int) is how many of the first steps adapt the kernel's
parameters (HMC/NUTS step size and mass matrix; MH ignores it).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

import ppl
from ppl.extend import format_address

__all__ = ["Kernel", "MHState", "MHInfo", "CycleState", "mh", "mh_proposal", "cycle"]


class Kernel(NamedTuple):
    """An MCMC kernel: `(init, step, refresh)`, pure functions.

    - `init(trace, *, observed=None, num_warmup=0) -> state`: the state at `trace`.
      `observed` is the constraints (a choice map, or addresses) the kernel must not
      move; pass them: HMC/NUTS without a `selection` move every choice not observed.
      `num_warmup` is a static int.
    - `step(key, state) -> (state, info)`: one transition; `state.trace` is the new
      trace, `info` a pytree of per-step diagnostics (scalars for one chain).
    - `refresh(state, trace) -> state`: the state re-derived at a trace another kernel
      produced (what `cycle` calls between kernels); the trace must come from the same
      model and arguments.

    A batch of chains is the vmap of `step` over `[num_chains]` keys and states.
    """

    init: Callable[..., Any]
    step: Callable[[jax.Array, Any], tuple[Any, Any]]
    refresh: Callable[[Any, ppl.Trace], Any]


class MHState(NamedTuple):
    """State of the Metropolis-Hastings kernels: the current trace."""

    trace: ppl.Trace


class MHInfo(NamedTuple):
    """`is_accepted`: [] bool; `log_alpha`: [] log acceptance ratio of the proposal;
    `accept_prob`: [] min(1, exp(log_alpha))."""

    is_accepted: jax.Array
    log_alpha: jax.Array
    accept_prob: jax.Array


def _accept(key, state: MHState, proposed: ppl.Trace, log_alpha) -> tuple[MHState, MHInfo]:
    # A NaN ratio (a proposal outside the support of a user proposal) is a rejection.
    log_alpha = jnp.where(jnp.isnan(log_alpha), -jnp.inf, log_alpha)
    is_accepted = jnp.log(jax.random.uniform(key)) < log_alpha
    trace = jax.tree.map(lambda new, old: jnp.where(is_accepted, new, old), proposed, state.trace)
    accept_prob = jnp.exp(jnp.minimum(log_alpha, 0.0))
    return MHState(trace), MHInfo(is_accepted, log_alpha, accept_prob)


def _replace_trace(state, trace):
    return state._replace(trace=trace)


def _check_not_observed(selected_paths, observed, where: str) -> None:
    both = sorted(set(selected_paths) & set(_paths(observed)))
    if both:
        raise ppl.ArgumentError(
            f"{where}: the kernel would move {', '.join(map(format_address, both))}, which the "
            "constraints observe. Select latent addresses only."
        )


def _paths(addresses) -> list[tuple]:
    if addresses is None:
        return []
    if isinstance(addresses, (ppl.ChoiceMap, dict)):
        return ppl.ChoiceMap.of(addresses).addresses()
    if isinstance(addresses, str):
        addresses = (addresses,)
    return [(a,) if isinstance(a, str) else tuple(a) for a in addresses]


def mh(selection) -> Kernel:
    """Metropolis-Hastings with the prior as proposal on the selected addresses.

    The selected choices are redrawn from their prior with `regenerate`, whose weight
    is the log MH ratio `log_alpha` (the change in density of everything not redrawn,
    factors and observations included); the move is accepted with probability
    min(1, exp(log_alpha)). Exact for any model; efficient when the prior of the
    selected sites is not much wider than their posterior.

    `selection`: a `ppl.Selection`, an address, or a list of addresses.

    >>> import numpyro.distributions as dist
    >>> @ppl.gen
    ... def model():
    ...     mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    ...     return ppl.sample("y", dist.Normal(mu, 1.0))
    >>> trace, _ = model.generate(jax.random.key(0), {"y": 1.0}, ())
    >>> kernel = inference.mh("mu")
    >>> state = kernel.init(trace, observed={"y": 1.0})
    >>> state, info = jax.jit(kernel.step)(jax.random.key(1), state)
    >>> info.is_accepted.shape, state.trace["y"]
    ((), Array(1., dtype=float32))
    """
    selection = _as_selection(selection)

    def init(trace, *, observed=None, num_warmup=0):
        _check_trace(trace, "mh")
        chosen = [a for a in trace.choices.addresses() if _selected(selection, a)]
        _check_not_observed(chosen, observed, "inference.mh")
        return MHState(trace)

    def step(key, state):
        k_move, k_accept = jax.random.split(key)
        proposed, log_alpha = state.trace.gen_fn.regenerate(k_move, state.trace, selection)
        return _accept(k_accept, state, proposed, log_alpha)

    return Kernel(init, step, _replace_trace)


def mh_proposal(proposal: ppl.GenerativeFunction, proposal_args: tuple = ()) -> Kernel:
    """Metropolis-Hastings with a user proposal generative function.

    Convention: `proposal` is called with args `(trace, *proposal_args)`, the current
    trace first; its random choices are named by the model addresses they propose
    (e.g. a random walk `ppl.sample("mu", dist.Normal(trace["mu"], 0.5))`). One step:

        forward  = proposal.simulate(key, (trace, *proposal_args))
        new, w, discard = model.update(key, trace, forward.choices, trace.args)
        backward = proposal.assess(discard, (new, *proposal_args))
        log_alpha = w + backward - forward.score

    `discard` holds the old values at the proposed addresses, so `backward` is the
    density of proposing the reverse move from the new trace. The proposal must
    propose the same addresses from every trace (a fixed set), and be able to assess
    the reverse move. A proposal outside the model's support gets log_alpha = -inf
    and is rejected.
    """
    if not isinstance(proposal, ppl.GenerativeFunction):
        raise ppl.ArgumentError(
            f"inference.mh_proposal: the proposal must be a generative function (decorate it "
            f"with @ppl.gen), got {type(proposal).__name__}."
        )
    proposal_args = tuple(proposal_args)

    def init(trace, *, observed=None, num_warmup=0):
        _check_trace(trace, "mh_proposal")
        forward = jax.eval_shape(lambda t: proposal.simulate(jax.random.key(0), (t, *proposal_args)), trace)
        _check_not_observed(forward.choices.addresses(), observed, "inference.mh_proposal")
        return MHState(trace)

    def step(key, state):
        k_forward, k_update, k_accept = jax.random.split(key, 3)
        trace = state.trace
        forward = proposal.simulate(k_forward, (trace, *proposal_args))
        new, log_weight, discard = trace.gen_fn.update(k_update, trace, forward.choices, trace.args)
        backward, _ = proposal.assess(discard, (new, *proposal_args))
        return _accept(k_accept, state, new, log_weight + backward - forward.score)

    return Kernel(init, step, _replace_trace)


class CycleState(NamedTuple):
    """State of `cycle`: one state per kernel; `trace` is the last kernel's trace."""

    states: tuple

    @property
    def trace(self) -> ppl.Trace:
        return self.states[-1].trace


def cycle(*kernels: Kernel) -> Kernel:
    """The kernels applied in sequence, as one step (a deterministic-scan Gibbs sweep).

    Each kernel starts from the trace the previous one left (its `refresh`), so e.g.
    `cycle(mh("k"), nuts(selection="theta"))` updates a discrete site by MH and the
    continuous ones by NUTS. The info is the tuple of the kernels' infos.
    Each kernel leaves its target distribution invariant, so the cycle does too.
    """
    if not kernels or not all(isinstance(k, Kernel) for k in kernels):
        raise ppl.ArgumentError(
            "inference.cycle expects one or more kernels, e.g. cycle(inference.mh('k'), inference.nuts())."
        )

    def init(trace, *, observed=None, num_warmup=0):
        return CycleState(tuple(k.init(trace, observed=observed, num_warmup=num_warmup) for k in kernels))

    def step(key, state):
        keys = jax.random.split(key, len(kernels))
        trace, states, infos = state.trace, [], []
        for kernel, sub, k in zip(kernels, state.states, keys):  # a static sweep, unrolled once
            sub = kernel.refresh(sub, trace) if len(kernels) > 1 else sub
            sub, info = kernel.step(k, sub)
            trace = sub.trace
            states.append(sub)
            infos.append(info)
        return CycleState(tuple(states)), tuple(infos)

    def refresh(state, trace):
        return CycleState(tuple(k.refresh(s, trace) for k, s in zip(kernels, state.states)))

    return Kernel(init, step, refresh)


def _as_selection(selection) -> ppl.Selection:
    if isinstance(selection, ppl.Selection):
        return selection
    if isinstance(selection, (str, tuple)):
        return ppl.select(selection)
    if isinstance(selection, (list, set, frozenset)):
        return ppl.select(*selection)
    raise ppl.ArgumentError(
        f"inference.mh: expected a selection, got {type(selection).__name__}; write inference.mh('x'), "
        "inference.mh(['x', ('sub', 'z')]) or inference.mh(ppl.select(...))."
    )


def _selected(selection, address: tuple) -> bool:
    return address in selection  # also True below a selected nested call


def _check_trace(trace, where: str) -> None:
    if not isinstance(trace, ppl.Trace):
        raise ppl.ArgumentError(
            f"inference.{where}: init expects a Trace (from model.generate(key, constraints, args)), "
            f"got {type(trace).__name__}."
        )
