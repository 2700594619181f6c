"""Particle Gibbs: conditional SMC as an `inference.Kernel`, alone or alternated with a
kernel on the model's parameters.

The model form is an ordinary `@ppl.gen` model that samples its parameters and then
calls a `ppl.scan` state-space model at one address, the parameters entering the scan
through its args (the initial carry or the per-step inputs):

    @ppl.gen
    def model(T):
        a = ppl.sample("a", dist.Uniform(-1.0, 1.0))
        return ppl.sample("states", ppl.scan(step, length=T), (0.0, a), None)

`particle_gibbs("states", inference.mh("a"), 20)` updates the states by conditional
SMC given the parameters (the scan's args, read from the trace), then the parameters by
the given kernel with the states held fixed. Both kernels leave the joint posterior
invariant, so `inference.run_mcmc` runs chains of it as of any kernel. `csmc_kernel`
is the state update alone: on a bare `ppl.scan` model, iterated conditional SMC.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from inference import Kernel
from ppl import ArgumentError, ChoiceMap, GenFunction, ScanGF, Trace
from ppl.extend import format_address

from ._csmc import check_num_particles, check_proposal, conditional_smc

__all__ = ["csmc_kernel", "particle_gibbs", "CSMCState", "CSMCInfo", "ParticleGibbsState", "ParticleGibbsInfo"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["trace"],
                   meta_fields=["address", "latent", "observed"])
@dataclasses.dataclass(frozen=True)
class CSMCState:
    """State of `csmc_kernel`.

    Fields:
      trace:    the model's current trace.
      address:  (static) the path of the scan call in the model, () for a bare scan.
      latent:   (static) the scan's latent addresses (relative to the scan), moved.
      observed: (static) the scan's observed addresses, the conditional filter's
                observations (their values are read from the trace).
    """

    trace: Trace
    address: tuple
    latent: tuple
    observed: tuple


class CSMCInfo(NamedTuple):
    """Per-step diagnostics of a conditional SMC move, scalars per chain:
    `num_steps_moved` (int32, how many of the T steps' latent values changed),
    `log_marginal` (the conditional filter's log evidence estimate), `carry_mismatch`
    (bool: ancestor sampling met a carry that depends on the previous carry; see
    `smc.csmc`)."""

    num_steps_moved: jax.Array
    log_marginal: jax.Array
    carry_mismatch: jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["csmc", "params"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ParticleGibbsState:
    """State of `particle_gibbs`: the conditional SMC state and the parameter kernel's
    state; `trace` is the current trace (the parameter kernel's)."""

    csmc: CSMCState
    params: Any

    @property
    def trace(self) -> Trace:
        return self.params.trace


class ParticleGibbsInfo(NamedTuple):
    """`csmc`: the state move's `CSMCInfo`; `params`: the parameter kernel's info."""

    csmc: CSMCInfo
    params: Any


def csmc_kernel(num_particles: int, *, address=None, ancestor_sampling: bool = False, proposal=None) -> Kernel:
    """Conditional SMC as an MCMC kernel on the states of a state-space model.

    Each step runs `smc.csmc` with `num_particles` particles, the current states as
    the reference and the scan's observed choices as observations, and moves the trace
    to the drawn trajectory. It leaves p(states | everything else) invariant.

    Args:
      num_particles: N >= 2.
      address: where the model calls its `ppl.scan` (a string or a tuple path); None
        (the default) when the model is the scan itself.
      ancestor_sampling: particle Gibbs with ancestor sampling (see `smc.csmc`).
      proposal: optional proposal of the free particles' latent choices.

    `init(trace, observed=...)` takes the observed addresses (as every kernel; the
    runner passes the constraints): those under the scan are the filter's
    observations, the scan's other choices are moved. The info is a `CSMCInfo`.

    >>> import numpyro.distributions as dist, ppl, inference
    >>> @ppl.gen
    ... def step(x, _):
    ...     x = ppl.sample("x", dist.Normal(0.9 * x, 1.0))
    ...     ppl.sample("y", dist.Normal(x, 0.5))
    ...     return x, None
    >>> model = ppl.scan(step, length=10)
    >>> obs = {"y": jnp.linspace(-1.0, 1.0, 10)}
    >>> samples = inference.run_mcmc(jax.random.key(0), csmc_kernel(8, ancestor_sampling=True), model,
    ...                              (0.0, None), obs, num_warmup=10, num_samples=20, num_chains=2)
    >>> samples["x"].shape
    (2, 20, 10)
    """
    return _csmc_kernel(check_num_particles(num_particles, "smc.csmc_kernel"), _address(address),
                        bool(ancestor_sampling), _proposal(proposal, "smc.csmc_kernel"))


def particle_gibbs(address, kernel: Kernel, num_particles: int, *, ancestor_sampling: bool = False,
                   proposal=None) -> Kernel:
    """Particle Gibbs: conditional SMC on a model's states, `kernel` on the rest.

    The model is a `@ppl.gen` model whose parameters enter a `ppl.scan` called at
    `address` through its args (see the module docs). One step: (1) `csmc_kernel`
    draws new states given the parameters and the observations; (2) `kernel` (e.g.
    `inference.mh("a")`, `inference.nuts()`, `inference.gibbs("k")`) moves the other
    latent choices with the states held fixed (they are passed to its `init` as
    observed, so `inference.nuts()` without a selection moves every parameter and no
    state). Each part leaves the joint posterior invariant, so the sweep does
    (Andrieu, Doucet & Holenstein 2010; with `ancestor_sampling`, Lindsten, Jordan &
    Schön 2014). Run it with `inference.run_mcmc`; `num_warmup` adapts `kernel`.

    The model's other sites must not depend on the states: the conditional filter
    targets the states given the scan's args and its own observations.

    Args:
      address: the path of the scan call, a string or a tuple path.
      kernel: an `inference.Kernel` for the parameters.
      num_particles: N >= 2 particles of the conditional filter.
      ancestor_sampling: redraw the reference's ancestors (better mixing with few
        particles; requires a Markov carry, see `smc.csmc`).
      proposal: optional proposal of the free particles' latent choices.

    The info is a `ParticleGibbsInfo(csmc, params)`.

    >>> import numpyro.distributions as dist, ppl, inference
    >>> @ppl.gen
    ... def step(carry, _):
    ...     x, a = carry
    ...     x = ppl.sample("x", dist.Normal(a * x, 1.0))
    ...     ppl.sample("y", dist.Normal(x, 0.5))
    ...     return (x, a), None
    >>> @ppl.gen
    ... def model():
    ...     a = ppl.sample("a", dist.Uniform(-1.0, 1.0))
    ...     return ppl.sample("states", ppl.scan(step, length=10), (0.0, a), None)
    >>> obs = {"states": {"y": jnp.linspace(-1.0, 1.0, 10)}}
    >>> kernel = particle_gibbs("states", inference.mh("a"), 8, ancestor_sampling=True)
    >>> samples = inference.run_mcmc(jax.random.key(0), kernel, model, (), obs,
    ...                              num_warmup=10, num_samples=20, num_chains=2)
    >>> samples["a"].shape, samples[("states", "x")].shape
    ((2, 20), (2, 20, 10))
    """
    where = "smc.particle_gibbs"
    if not isinstance(kernel, Kernel):
        raise ArgumentError(
            f"{where}: kernel must be an inference.Kernel for the parameters (inference.mh('a'), "
            f"inference.nuts(), ...), got {type(kernel).__name__}.")
    path = _address(address)
    if not path:
        raise ArgumentError(
            f"{where}: address must name the scan call in the model (e.g. 'states'); for a bare ppl.scan "
            "model there is nothing else to update: use smc.csmc_kernel.")
    states = _csmc_kernel(check_num_particles(num_particles, where), path, bool(ancestor_sampling),
                          _proposal(proposal, where))
    return _particle_gibbs(states, kernel)


@functools.lru_cache(maxsize=None)  # equal requests, equal kernels: a second run compiles nothing
def _csmc_kernel(num_particles: int, address: tuple, ancestor_sampling: bool, proposal) -> Kernel:
    def init(trace, *, observed=None, num_warmup=0):
        scan = scan_subtrace(trace, address, "smc.csmc_kernel")
        observed_paths = set(_paths(observed))
        below = [a[len(address):] for a in observed_paths if a[: len(address)] == address]
        choices = scan.choices.addresses()
        latent = tuple(a for a in choices if a not in set(below))
        if not latent:
            raise ArgumentError(
                f"smc.csmc_kernel: the scan at {format_address(address) if address else 'the top level'} has no "
                "latent choice to move: every choice is observed.")
        return CSMCState(trace, address, latent, tuple(a for a in choices if a in set(below)))

    def step(key, state):
        k_run, k_update = jax.random.split(key)
        scan = scan_subtrace(state.trace, state.address, "smc.csmc_kernel")
        choices = scan.choices
        observations = ChoiceMap({a: choices[a] for a in state.observed})
        reference = ChoiceMap({a: choices[a] for a in state.latent})
        out = conditional_smc(k_run, scan.gen_fn, scan.args, observations, reference, num_particles,
                              ancestor_sampling, proposal)
        new = out[-1].choices
        moved = [jnp.any((new[a] != choices[a]).reshape(new[a].shape[0], -1), axis=1) for a in state.latent]
        constraints = ChoiceMap({state.address + a: new[a] for a in state.latent})
        trace, _, _ = state.trace.gen_fn.update(k_update, state.trace, constraints, state.trace.args)
        info = CSMCInfo(jnp.sum(jnp.any(jnp.stack(moved), axis=0)).astype(jnp.int32), out[5], jnp.any(out[6]))
        return dataclasses.replace(state, trace=trace), info

    def refresh(state, trace):
        return dataclasses.replace(state, trace=trace)

    return Kernel(init, step, refresh)


@functools.lru_cache(maxsize=None)
def _particle_gibbs(states: Kernel, params: Kernel) -> Kernel:
    def init(trace, *, observed=None, num_warmup=0):
        c = states.init(trace, observed=observed)
        held = list(_paths(observed)) + [c.address + a for a in c.latent]
        return ParticleGibbsState(c, params.init(trace, observed=held, num_warmup=num_warmup))

    def step(key, state):
        k_states, k_params = jax.random.split(key)
        c, c_info = states.step(k_states, states.refresh(state.csmc, state.trace))
        p, p_info = params.step(k_params, params.refresh(state.params, c.trace))
        return ParticleGibbsState(c, p), ParticleGibbsInfo(c_info, p_info)

    def refresh(state, trace):
        return ParticleGibbsState(states.refresh(state.csmc, trace), params.refresh(state.params, trace))

    return Kernel(init, step, refresh)


def scan_subtrace(trace: Trace, address: tuple, where: str) -> Trace:
    """The trace of the `ppl.scan` call at `address` of a DSL model's trace (the trace
    itself for address ())."""
    node = trace
    for i, part in enumerate(address):
        records = node.inner if isinstance(node.gen_fn, GenFunction) else None
        record = records.get(part) if isinstance(records, dict) else None
        if not isinstance(record, Trace):
            raise ArgumentError(_form_error(where, address, trace, f"{format_address(address[: i + 1])} is no "
                                            "call of a generative function in it"))
        node = record
    if not isinstance(node.gen_fn, ScanGF):
        what = f"its {format_address(address)} is a call of {node.gen_fn.__name__}" if address else \
            f"it is {node.gen_fn.__name__}"
        raise ArgumentError(_form_error(where, address, trace, what))
    return node


def _form_error(where: str, address: tuple, trace: Trace, what: str) -> str:
    at = format_address(address) if address else "the top level"
    return (
        f"{where}: expected a state-space model: a ppl.scan at {at} of the model, but {what} "
        f"(model {trace.gen_fn.__name__}). Write the states as ppl.scan(step, length=T), step a generative "
        "function (carry, x) -> (new_carry, y), and call it from the model with the parameters in its args: "
        "ppl.sample('states', ppl.scan(step, length=T), init_carry, xs); then pass address='states'.")


def _address(address) -> tuple:
    if address is None:
        return ()
    if isinstance(address, str):
        return (address,)
    if isinstance(address, tuple) and all(isinstance(a, str) for a in address):
        return address
    raise ArgumentError(f"smc: address must be a string or a tuple of strings, got {address!r}.")


def _proposal(proposal, where: str):
    check_proposal(proposal, where)
    return proposal


def _paths(addresses) -> list:
    if addresses is None:
        return []
    if isinstance(addresses, (ChoiceMap, dict)):
        return ChoiceMap.of(addresses).addresses()
    if isinstance(addresses, str):
        addresses = (addresses,)
    return [(a,) if isinstance(a, str) else tuple(a) for a in addresses]
