"""HMC and NUTS kernels on a model's unconstrained density, reusing numpyro's functional
kernels (`numpyro.infer.hmc.hmc`) and their warmup adaptation (dual-averaging step
size, Welford diagonal or dense mass matrix, windowed as in Stan).

The potential energy is `U(u) = -unconstrained(model, fixed).assess(u + fixed, args)[0]`:
`u` holds the moved choices on the real line (numpyro's `biject_to` per site, with the
log-Jacobian), `fixed` the observed and unselected choices read from the trace. The
state keeps numpyro's `HMCState` (with `z = u`, a `ChoiceMap`) next to the model's
trace at `x = t(u)`, so HMC composes with kernels that move the trace (`cycle`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro.infer.hmc import HMCState as NumpyroHMCState
from numpyro.infer.hmc import hmc as numpyro_hmc
from numpyro.infer.util import ParamInfo

import ppl
from ppl.extend import format_address, normalize_address, unrolled_key

from ._kernels import Kernel, _check_not_observed, _check_trace, _paths, _selected
from ._unconstrained import to_constrained, to_unconstrained, unconstrained

__all__ = ["hmc", "nuts", "HMCState", "HMCInfo"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["trace", "hmc"],
                   meta_fields=["moved", "num_warmup", "shapes"])
@dataclasses.dataclass(frozen=True)
class HMCState:
    """State of the HMC/NUTS kernels.

    Fields:
      trace:      the model's trace at the current position (constrained values).
      hmc:        numpyro's `HMCState`; `hmc.z` (and `hmc.z_grad`) holds the moved choices
                  on the real line, one vector `[d]` with the sites in `moved` order
                  (`position()` gives them per site), or, with a block-structured
                  `dense_mass`, a dict tuple path -> value, as numpyro's block mass
                  matrices index by site. `hmc.adapt_state` holds the step size and the
                  inverse mass matrix (`[d]`, `[d, d]`, or a dict block -> matrix).
      moved:      (static) the addresses HMC moves, tuple paths.
      num_warmup: (static) steps `0 .. num_warmup - 1` adapt step size and mass matrix.
      shapes:     (static) each moved site's shape and dtype on the real line, in `moved`
                  order, when `hmc.z` is one vector; None when it is a dict.
    """

    trace: ppl.Trace
    hmc: NumpyroHMCState
    moved: tuple
    num_warmup: int
    shapes: tuple | None = None

    def position(self, grad: bool = False) -> dict:
        """The moved choices on the real line (or, with `grad=True`, the gradient there of
        the potential energy U = -log density), a dict tuple path -> array; leading batch
        axes are kept."""
        return _per_site(self.hmc.z_grad if grad else self.hmc.z, self.moved, self.shapes)


class HMCInfo(NamedTuple):
    """Per-step diagnostics, scalars per chain: `accept_prob` (mean Metropolis
    acceptance along the trajectory), `is_divergent` (energy error above 1000),
    `num_steps` (leapfrog steps), `step_size` (used), `potential_energy` (at the new
    position, -log density on the real line)."""

    accept_prob: jax.Array
    is_divergent: jax.Array
    num_steps: jax.Array
    step_size: jax.Array
    potential_energy: jax.Array


@dataclasses.dataclass(frozen=True)
class _Config:
    algo: str
    step_size: float
    num_steps: int | None
    trajectory_length: float | None
    max_tree_depth: int
    adapt_step_size: bool
    adapt_mass_matrix: bool
    dense_mass: Any  # a bool, or a tuple of blocks (each a tuple of tuple paths)
    target_accept_prob: float
    selection: Any  # None (every unobserved choice), a tuple of paths, or a ppl.Selection

    def numpyro_options(self) -> dict:
        return dict(
            step_size=self.step_size,
            num_steps=self.num_steps,
            trajectory_length=self.trajectory_length,
            max_tree_depth=self.max_tree_depth,
            adapt_step_size=self.adapt_step_size,
            adapt_mass_matrix=self.adapt_mass_matrix,
            dense_mass=list(self.dense_mass) if isinstance(self.dense_mass, tuple) else self.dense_mass,
            target_accept_prob=self.target_accept_prob,
        )


def hmc(
    step_size: float = 1.0,
    num_steps: int | None = None,
    *,
    trajectory_length: float | None = None,
    adapt_step_size: bool = True,
    adapt_mass_matrix: bool = True,
    dense_mass=False,
    target_accept_prob: float = 0.8,
    selection=None,
) -> Kernel:
    """Hamiltonian Monte Carlo (numpyro's kernel) on the model's unconstrained density.

    Each step draws a momentum, runs `num_steps` leapfrog steps of size `step_size`
    (or a fixed `trajectory_length`, default 2*pi, when `num_steps` is None) and
    accepts the end point with probability min(1, exp(-ΔH)). During the first
    `num_warmup` steps (given to `init`) the step size is adapted by dual averaging
    towards `target_accept_prob` and the inverse mass matrix by Welford estimates over
    Stan's windows: diagonal (`dense_mass=False`), dense over every moved coordinate
    (`True`), or block-diagonal: `dense_mass=[("mu", "tau"), ("beta",)]` adapts one dense
    block for the correlated `mu` and `tau`, one for the elements of `beta`, and a
    diagonal for the other sites (NumPyro's convention; addresses as strings or tuple
    paths).

    `selection`: addresses to move (default: every random choice not observed). The
    other choices stay fixed at the trace's values, so `cycle(mh("k"), hmc(selection=
    "theta"))` is HMC-within-Gibbs. The moved sites must be continuous.

    >>> import numpyro.distributions as dist
    >>> @ppl.gen
    ... def model():
    ...     s = ppl.sample("s", dist.HalfNormal(1.0))
    ...     return ppl.sample("y", dist.Normal(0.0, s))
    >>> trace, _ = model.generate(jax.random.key(0), {"y": 0.5}, ())
    >>> kernel = inference.hmc(step_size=0.3, num_steps=5)
    >>> state = kernel.init(trace, observed={"y": 0.5})
    >>> state, info = jax.jit(kernel.step)(jax.random.key(1), state)
    >>> bool(state.trace["s"] > 0), info.num_steps
    (True, Array(5, dtype=int32))
    """
    if num_steps is not None and trajectory_length is not None:
        raise ppl.ArgumentError(
            "inference.hmc: give num_steps or trajectory_length, not both (the step size "
            "could not be adapted)."
        )
    if num_steps is None and trajectory_length is None:
        trajectory_length = 2 * math.pi
    return _kernel(_Config(
        "HMC", float(step_size), None if num_steps is None else int(num_steps),
        None if trajectory_length is None else float(trajectory_length), 10,
        bool(adapt_step_size), bool(adapt_mass_matrix), _dense(dense_mass), float(target_accept_prob),
        _selection(selection),
    ))


def nuts(
    step_size: float = 1.0,
    *,
    max_tree_depth: int = 10,
    adapt_step_size: bool = True,
    adapt_mass_matrix: bool = True,
    dense_mass=False,
    target_accept_prob: float = 0.8,
    selection=None,
) -> Kernel:
    """The No-U-Turn Sampler (numpyro's kernel) on the model's unconstrained density.

    Trajectories double until they turn back (at most `2**max_tree_depth` leapfrog
    steps); the next state is drawn from the trajectory by multinomial sampling.
    Warmup adaptation and `selection` as in `hmc`.
    """
    return _kernel(_Config(
        "NUTS", float(step_size), None, None, int(max_tree_depth),
        bool(adapt_step_size), bool(adapt_mass_matrix), _dense(dense_mass), float(target_accept_prob),
        _selection(selection),
    ))


def _dense(dense_mass):
    """True / False, or the blocks as a tuple of tuples of tuple paths."""
    if isinstance(dense_mass, bool):
        return dense_mass
    blocks = None
    if isinstance(dense_mass, (list, tuple)) and all(isinstance(b, (list, tuple)) and b for b in dense_mass):
        try:
            blocks = tuple(tuple(normalize_address(a) for a in b) for b in dense_mass)
        except ppl.PPLError:
            blocks = None
    if blocks is None:
        raise ppl.ArgumentError(
            "inference.hmc/nuts: dense_mass must be True, False, or a list of blocks of addresses, each "
            f"a tuple: dense_mass=[('mu', 'tau'), ('beta',)]; got {dense_mass!r}."
        )
    flat = [a for b in blocks for a in b]
    if len(set(flat)) < len(flat):
        twice = sorted({format_address(a) for a in flat if flat.count(a) > 1})
        raise ppl.ArgumentError(
            f"inference.hmc/nuts: dense_mass names {', '.join(twice)} in more than one block; each "
            "site belongs to one block of the mass matrix."
        )
    return blocks


def _check_blocks(config: _Config, moved: tuple, name: str) -> None:
    if not isinstance(config.dense_mass, tuple):
        return
    unknown = [a for b in config.dense_mass for a in b if a not in set(moved)]
    if unknown:
        raise ppl.ArgumentError(
            f"{name}: dense_mass names {', '.join(map(format_address, unknown))}, which the kernel does "
            f"not move; it moves {', '.join(map(format_address, moved))}."
        )


def _selection(selection):
    if selection is None or isinstance(selection, ppl.Selection):
        return selection
    return tuple(_paths(selection))


def _is_moved(config: _Config, address: tuple) -> bool:
    if config.selection is None:
        return True
    if isinstance(config.selection, ppl.Selection):
        return _selected(config.selection, address)
    return any(address[: len(p)] == p for p in config.selection)


# One kernel per configuration, so that equal requests are equal static arguments of
# the runner's jitted functions (a second run compiles nothing).
@functools.lru_cache(maxsize=None)
def _kernel(config: _Config) -> Kernel:
    name = f"inference.{config.algo.lower()}"

    def init(trace, *, observed=None, num_warmup=0):
        _check_trace(trace, config.algo.lower())
        observed_paths = set(_paths(observed))
        moved = tuple(a for a in trace.choices.addresses() if a not in observed_paths and _is_moved(config, a))
        if config.selection is not None:
            _check_not_observed([a for a in trace.choices.addresses() if _is_moved(config, a)], observed, name)
        if not moved:
            raise ppl.ArgumentError(
                f"{name}: {trace.gen_fn.__name__} has no latent random choice to move (every choice "
                "is observed or unselected). Sample at least one site without obs= or a constraint."
            )
        _check_blocks(config, moved, name)
        z, potential, shapes = _position(trace, moved, flat=not isinstance(config.dense_mass, tuple))
        pe, z_grad = jax.value_and_grad(potential)(z)
        init_kernel, _ = numpyro_hmc(potential_fn=potential, algo=config.algo)
        state = init_kernel(ParamInfo(z, pe, z_grad), int(num_warmup), **config.numpyro_options(),
                            rng_key=unrolled_key(jax.random.key(0)))
        state = state._replace(num_steps=jnp.asarray(state.num_steps, jnp.int32))  # as step's, under x64 too
        return HMCState(trace, state, moved, int(num_warmup), shapes)

    def step(key, state):
        model, args = state.trace.gen_fn, state.trace.args
        fixed, fixed_values = _fixed(state.trace, state.moved)
        potential = _potential(model, args, fixed, fixed_values, state.moved, state.shapes)
        init_kernel, sample_kernel = numpyro_hmc(potential_fn=potential, algo=config.algo)
        # numpyro's sample_kernel reads settings its init_kernel stores in the closure
        # (warmup schedule, integrator, tree depth: Python values). Called under
        # eval_shape, it sets them without putting its own work (a step-size search with
        # gradients, dead code XLA would remove) into the step's program.
        h = state.hmc
        jax.eval_shape(lambda info: init_kernel(info, state.num_warmup, **config.numpyro_options()),
                       ParamInfo(h.z, h.potential_energy, h.z_grad))
        # numpyro splits this key twice per leapfrog step: as unrolled Threefry, one
        # fused kernel on CPU instead of a loop over round blocks
        new = sample_kernel(h._replace(rng_key=unrolled_key(key)))
        new = new._replace(num_steps=jnp.asarray(new.num_steps, jnp.int32))  # HMC's is weakly typed
        u = _per_site(new.z, state.moved, state.shapes)
        trace = to_constrained(model, args, ppl.ChoiceMap(u).merge(fixed_values), fixed)
        info = HMCInfo(new.accept_prob, new.diverging, new.num_steps, h.adapt_state.step_size, new.potential_energy)
        return dataclasses.replace(state, trace=trace, hmc=new), info

    def refresh(state, trace):
        z, potential, _ = _position(trace, state.moved, flat=state.shapes is not None)
        pe, z_grad = jax.value_and_grad(potential)(z)
        return dataclasses.replace(state, trace=trace, hmc=state.hmc._replace(z=z, potential_energy=pe, z_grad=z_grad))

    return Kernel(init, step, refresh)


def _fixed(trace, moved: tuple):
    """The addresses of the choices HMC does not move, and their values in the trace."""
    choices = trace.choices
    fixed = tuple(a for a in choices.addresses() if a not in set(moved))
    return fixed, ppl.ChoiceMap({a: choices[a] for a in fixed})


def _potential(model, args, fixed: tuple, fixed_values: ppl.ChoiceMap, moved: tuple, shapes):
    on_real_line = unconstrained(model, fixed)

    def potential(z):
        return -on_real_line.assess(ppl.ChoiceMap(_per_site(z, moved, shapes)).merge(fixed_values), args)[0]

    return potential


def _position(trace, moved: tuple, flat: bool):
    """`(z, potential, shapes)`: the moved choices of `trace` on the real line, U, and each
    site's (shape, dtype) there. With `flat`, `z` is one vector, the sites raveled in
    `moved` order (numpyro's integrator and mass matrix then work on one array instead of
    one per site); else a dict tuple path -> array (the form numpyro's block mass matrices
    index by site) and `shapes` is None."""
    model, args = trace.gen_fn, trace.args
    fixed, fixed_values = _fixed(trace, moved)
    u = to_unconstrained(model, args, trace.choices, fixed)
    z, shapes = {a: u[a] for a in moved}, None
    if flat:
        shapes = tuple((tuple(jnp.shape(z[a])), jnp.result_type(z[a]).name) for a in moved)
        z = jnp.concatenate([jnp.ravel(z[a]) for a in moved])
    return z, _potential(model, args, fixed, fixed_values, moved, shapes), shapes


def _per_site(z, moved: tuple, shapes, xp=jnp):
    """A dict tuple path -> array from `z`: one vector `[..., d]`, the sites raveled in
    `moved` order, when `shapes` is given (else `z` is already the dict). `xp=np` for host
    arrays (no XLA op)."""
    if shapes is None:
        return dict(z)
    out, start, z = {}, 0, xp.asarray(z)
    batch = xp.shape(z)[:-1]
    for a, (shape, dtype) in zip(moved, shapes):
        size = math.prod(shape)
        out[a] = xp.reshape(z[..., start:start + size], batch + shape).astype(dtype)
        start += size
    return out

