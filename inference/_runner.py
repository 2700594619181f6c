"""Running MCMC chains: `run_mcmc` for any kernel, `run_nuts` for the common case.

Chains are a `jax.vmap` of the kernel's `step`; steps are a `jax.lax.scan` in chunks,
one jitted function for every chunk (warmup and sampling alike), so a second run with
the same shapes and new data values compiles nothing. Between chunks the host updates
the progress bar and keeps the draws past warmup. With several devices (GPUs, TPU cores,
or CPU devices forced with `XLA_FLAGS=--xla_force_host_platform_device_count=4`) and a
number of chains they divide, each device runs its own chains.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import ppl
from ppl.extend import (
    StatesProgram, StepProgram, check_args, check_count, check_key, combine, default_chunk, format_address, partition,
    progress_bar,
)

from ._checks import IMPROPER_START, check_constraint_values
from ._hmc import HMCState, _per_site, nuts
from ._kernels import CycleState, Kernel
from ._samples import Samples
from ._unconstrained import to_constrained, to_unconstrained

__all__ = ["run_mcmc", "run_nuts"]



def run_nuts(
    key,
    model: ppl.GenerativeFunction,
    args: tuple,
    constraints=None,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    num_chains: int = 4,
    *,
    progress_bar: bool | None = None,
    step_size: float = 1.0,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    init_strategy: str = "uniform",
    init=None,
    chunk_size: int | None = None,
) -> Samples:
    """NUTS on `model(*args)` given `constraints`: `num_chains` chains of `num_warmup`
    adaptation steps then `num_samples` draws. Returns `Samples` (`[num_chains,
    num_samples, ...]` per latent and deterministic site).

    Chains start at uniform(-2, 2) on the real line (`init_strategy="uniform"`, as
    NumPyro) or at a prior draw (`"prior"`); `init` fixes chosen latent values.
    Warns (`ConvergenceWarning`) on divergences or split r_hat > 1.01.
    See `run_mcmc` for the other arguments and errors.

    >>> import numpyro.distributions as dist
    >>> @ppl.gen
    ... def model():
    ...     mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    ...     return ppl.sample("y", dist.Normal(mu, 1.0))
    >>> samples = inference.run_nuts(jax.random.key(0), model, (), {"y": 1.0},
    ...                              num_warmup=100, num_samples=100, num_chains=1)
    >>> samples["mu"].shape
    (1, 100)
    """
    kernel = nuts(
        step_size, target_accept_prob=target_accept_prob, max_tree_depth=max_tree_depth, dense_mass=dense_mass
    )
    return run_mcmc(
        key, kernel, model, args, constraints, num_warmup=num_warmup, num_samples=num_samples,
        num_chains=num_chains, progress_bar=progress_bar, init_strategy=init_strategy, init=init,
        chunk_size=chunk_size, where="inference.run_nuts",
    )


def run_mcmc(
    key,
    kernel: Kernel,
    model: ppl.GenerativeFunction,
    args: tuple,
    constraints=None,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    num_chains: int = 4,
    *,
    progress_bar: bool | None = None,
    init_strategy: str = "prior",
    init=None,
    chunk_size: int | None = None,
    where: str = "inference.run_mcmc",
) -> Samples:
    """Run `num_chains` chains of `kernel` on `model(*args)` given `constraints`.

    Each chain starts from `model.generate(key_c, constraints | init, args)` (the prior
    for the other latent choices; `init_strategy="uniform"` instead draws them
    uniformly in (-2, 2) on the real line, continuous sites only), is initialized with
    `kernel.init(trace, observed=constraints, num_warmup=num_warmup)`, and takes
    `num_warmup + num_samples` steps; the last `num_samples` are the draws.

    Args:
      key: a `jax.random` key. Same key, same draws.
      kernel: an `inference.Kernel` (`mh`, `mh_proposal`, `hmc`, `nuts`, `cycle`).
      constraints: observations, a choice map or nested dict; never moved.
      progress_bar: None shows a tqdm bar when stderr is a terminal and `CI` is unset.
      chunk_size: steps per jitted scan between host updates (default: total / 20 with a
        progress bar, else all steps in one scan).

    Returns `Samples`: `samples[address]` is `[num_chains, num_samples, ...]` for every
    latent choice and deterministic site; `samples.info` the kernel's per-step info;
    `samples.divergences` `[num_chains]`. Warns (`ConvergenceWarning`) on divergences
    or split r_hat > 1.01.

    A chain whose start has a non-finite log density (or gradient) draws a new start, up
    to 100 times, as Stan and NumPyro do; starts given in `init` are not redrawn.

    Raises `ArgumentError` when the model has no latent choice, `InferenceError` naming
    the site and its value when a chain still starts at a non-finite log density (or
    gradient).
    """
    if not isinstance(kernel, Kernel):
        raise ppl.ArgumentError(
            f"{where}: kernel must be an inference.Kernel (inference.nuts(), inference.mh('x'), ...), "
            f"got {type(kernel).__name__}."
        )
    if not isinstance(model, ppl.GenerativeFunction):
        raise ppl.ArgumentError(
            f"{where}: model must be a generative function (decorate it with @ppl.gen), got {type(model).__name__}."
        )
    key = check_key(key, model, where)
    args = check_args(args, model, where)
    num_warmup = check_count(num_warmup, "num_warmup", where, 0)
    num_samples = check_count(num_samples, "num_samples", where, 1)
    num_chains = check_count(num_chains, "num_chains", where, 1)
    if init_strategy not in ("prior", "uniform"):
        raise ppl.ArgumentError(f"{where}: init_strategy must be 'prior' or 'uniform', got {init_strategy!r}.")
    constraints = ppl.ChoiceMap.of(constraints)
    init = ppl.ChoiceMap.of(init)
    check_constraint_values(model, args, constraints, where)
    dynamic, static = partition(args)
    observed = tuple(constraints.addresses())
    latent, deterministic = _sites(model, args, constraints, dynamic, static)
    if not latent:
        raise ppl.ArgumentError(
            f"{where}: {model.__name__} has no latent random choice given these constraints "
            f"({', '.join(map(format_address, observed)) or 'none'}): there is nothing to sample. "
            "Remove a constraint, or evaluate the density with model.assess instead."
        )
    # The chains' states hold the arguments and observations once, not once per chain
    # (`own` is the per-chain part): every gradient reads the one copy.
    shared = (dynamic, constraints)
    program = _start_program(
        key, dynamic, constraints, init, static=static, model=model, kernel=kernel, num_warmup=num_warmup,
        observed=observed, latent=latent, init_strategy=init_strategy,
    )
    total = num_warmup + num_samples
    chunk = int(chunk_size) if chunk_size is not None else default_chunk(total, progress_bar)
    # The step program is traced from the starts' shapes, and the chunk program compiles in
    # a background thread while the chains start (their own compile and run): the two
    # compilations overlap instead of adding up. Keys are split inside the compiled
    # programs: an eager `jax.random.split` compiles a program of its own at a first call.
    own_shapes = program.own_shapes(num_chains)
    stepper = _step_program(program, kernel, _Collect(latent, deterministic), key, own_shapes, shared)
    chunk_program = _chunk_program(key, stepper.adopt(own_shapes, num_chains), shared, stepper=stepper,
                                   chunk_size=chunk, num_chains=num_chains)
    start = functools.partial(_start, program=program, stepper=stepper, num_chains=num_chains)
    own, k_run = start(key, np.uint32(0), init, shared)
    view = functools.partial(stepper.layout.join, shared=shared, broadcast=_host_broadcast(num_chains))
    bad = _bad_chains(view(own))
    # As Stan and NumPyro: a chain that starts where the density or its gradient is not
    # finite draws a new start, up to _INIT_ATTEMPTS times; then the error names the site.
    for attempt in range(1, _INIT_ATTEMPTS if bad.any() and _random_start(latent, init) else 0):
        retry, _ = start(key, np.uint32(attempt), init, shared)
        take = jnp.asarray(bad)
        own = [o if u else jnp.where(take.reshape((-1,) + (1,) * (jnp.ndim(o) - 1)), r, o)
               for o, r, u in zip(own, retry, stepper.layout.uniform)]
        bad = _bad_chains(view(own))
        if not bad.any():
            break
    _check_initial(view(own), bad, model, where, _INIT_ATTEMPTS if _random_start(latent, init) else 1)
    run_chunk, place = chunk_program.result()
    k_run, own, shared = place(k_run, own, shared)
    bar = _progress(progress_bar, total, num_warmup, num_chains)
    kept_draws, kept_info = [], []

    def settle(chunk_out, start, stop, steps, label):
        """Keep a finished chunk's draws past warmup; advance the bar."""
        draws, info = chunk_out
        if start < stop:
            kept_draws.append(jax.tree.map(lambda x: np.asarray(x)[:, start:stop], draws))
            kept_info.append(jax.tree.map(lambda x: np.asarray(x)[:, start:stop], info))
        if bar is not None:
            jax.block_until_ready(chunk_out)
            bar.set_description(label)
            bar.update(steps)

    # The next chunk is dispatched before the host copies the previous one's draws, so the
    # device never waits for the host between chunks.
    pending = None
    try:
        for index in range(math.ceil(total / chunk)):
            own, chunk_out = run_chunk(k_run, np.uint32(index), own, shared)
            if pending is not None:
                settle(*pending)
            done = index * chunk
            steps = min(chunk, total - done)
            label = "warmup" if done + steps < num_warmup else "sample"
            pending = (chunk_out, max(num_warmup - done, 0), steps, steps, label)  # past warmup: [start, stop)
        settle(*pending)
    finally:
        if bar is not None:
            bar.close()
    # jax.device_put, not jnp.asarray: that compiles a copy program per shape
    join = lambda *xs: jax.device_put(np.concatenate(xs, axis=1))  # noqa: E731
    samples = Samples(
        jax.tree.map(join, *kept_draws), jax.tree.map(join, *kept_info), deterministic=deterministic
    )
    samples._warn_if_suspect(stacklevel=3 if where == "inference.run_mcmc" else 4)
    return samples


class _Collect(NamedTuple):
    """What a chain records per step: its latent choices and deterministic values."""

    latent: tuple
    deterministic: tuple

    def __call__(self, trace: ppl.Trace) -> dict:
        choices = trace.choices
        out = {p: choices[p] for p in self.latent}
        out.update({p: trace[p] for p in self.deterministic})
        return out


_CHUNK_PROGRAMS: dict = {}
_COMPILER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference-compile")


def _chunk_program(key, own, shared, *, stepper, chunk_size, num_chains) -> concurrent.futures.Future:
    """A future of `(run, place)`: `run(key, index, own, shared)` is `_run_chunk` for these
    chains, traced and lowered here from the shapes of `own`, compiled in a background
    thread (XLA releases the GIL while it compiles) and cached by signature, so a second
    run with the same shapes compiles nothing; `place(key, own, shared)` puts the inputs where `run`
    expects them. With several devices the chains' leaves are split over them and the
    rest replicated (`NamedSharding`s), from the first chunk on: the program is compiled
    once, for the layout its own outputs have.
    """
    shardings = _shardings(num_chains, stepper.layout.uniform)
    if shardings is None:
        def place(key, own, shared):
            return key, own, shared
    else:
        def place(key, own, shared):
            return (jax.device_put(key, replicated), [_split_put(o, s) for o, s in zip(own, own_shardings)],
                    jax.device_put(shared, replicated))

    def abstract(x, sharding):
        t = jax.typeof(x) if not isinstance(x, jax.ShapeDtypeStruct) else x
        return jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sharding, weak_type=t.weak_type)

    own_shardings, replicated = shardings if shardings is not None else ([None] * len(own), None)
    args = (abstract(key, replicated), abstract(jax.ShapeDtypeStruct((), jnp.uint32), replicated),
            [abstract(o, s) for o, s in zip(own, own_shardings)],
            jax.tree.map(lambda x: abstract(x, replicated), shared))
    leaves = jax.tree.leaves(args)
    signature = (stepper, chunk_size, num_chains, jax.config.jax_enable_x64, len(jax.devices()),
                 jax.tree.structure(args), tuple((x.shape, x.dtype, x.weak_type) for x in leaves))
    if signature not in _CHUNK_PROGRAMS:
        # Traced and lowered here, compiled in the background: tracing in the background
        # too would contend for the GIL with the chains' start, whose compile then waits.
        lowered = _run_chunk.trace(*args, stepper=stepper, chunk_size=chunk_size, num_chains=num_chains).lower()

        def compile_chunk():
            try:
                compiled = lowered.compile()
            except BaseException:
                del _CHUNK_PROGRAMS[signature]  # the next call tries again (and raises in its thread)
                raise
            if replicated is None:
                return compiled, place
            return (lambda key, index, own, shared: compiled(key, jax.device_put(index, replicated), own, shared)), place

        _CHUNK_PROGRAMS[signature] = _COMPILER.submit(compile_chunk)
    return _CHUNK_PROGRAMS[signature]


def _through_host(leaf, fn):
    """`fn(array)` on the leaf's host copy, so no eager XLA op (each compiles a program of
    its own at a first call); a key array, which has no host form, goes through its key
    data and is wrapped again."""
    if jax.dtypes.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(fn(np.asarray(jax.random.key_data(leaf))), impl=jax.random.key_impl(leaf))
    return fn(np.asarray(leaf))


def _split_put(leaf, sharding):
    """`jax.device_put(leaf, sharding)` through the host: put from one device, a leaf split
    over several compiles a slicing program per shape (0.06 s each at a first call)."""
    return _through_host(leaf, lambda a: jax.device_put(a, sharding))


def _shardings(num_chains: int, uniform: tuple):
    """`(own, replicated)`: the chains' `NamedSharding` per own leaf (split over the
    devices, or replicated for a uniform leaf) and the replicated one; None on one device
    or when the devices do not divide the chains."""
    mesh = _chain_mesh(num_chains)
    if mesh is None:
        return None
    chains, replicated = NamedSharding(mesh, PartitionSpec("chains")), NamedSharding(mesh, PartitionSpec())
    return [replicated if u else chains for u in uniform], replicated


def _chain_mesh(num_chains: int):
    """A one-axis mesh ("chains") over the devices, or None on one device or when the
    devices do not divide the chains."""
    devices = jax.devices()
    if len(devices) < 2 or num_chains % len(devices):
        return None
    return Mesh(np.asarray(devices), ("chains",))


@functools.partial(jax.jit, static_argnames=("stepper", "chunk_size", "num_chains"))
def _run_chunk(key, index, own, shared, *, stepper, chunk_size, num_chains):
    keys = jax.random.split(jax.random.fold_in(key, index), (num_chains, chunk_size))
    uniform = stepper.layout.uniform

    def chains(keys, own, shared):
        def body(own, k):
            return stepper(k, own, shared)

        own, out = jax.lax.scan(body, own, jnp.swapaxes(keys, 0, 1))
        return own, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), out)  # [chains, steps, ...]

    return _over_devices(chains, num_chains, uniform)(keys, own, shared)


def _over_devices(fn, num_chains: int, uniform: tuple):
    """`fn(keys, own, shared)` (chains vmapped) split by chain over the devices, when there
    are several and they divide the chains: each device runs its own chains' loops
    (`shard_map`), so a NUTS chain's tree building waits only for the chains on its
    device, as with NumPyro's `chain_method="parallel"`; `shared` and the leaves every
    chain has in common (`uniform`) are replicated. On one device, `fn` itself."""
    mesh = _chain_mesh(num_chains)
    if mesh is None:
        return fn
    chains, replicated = PartitionSpec("chains"), PartitionSpec()
    own = [replicated if u else chains for u in uniform]
    # check_vma off: numpyro's kernels mix per-chain and constant values in lax.cond
    return jax.shard_map(fn, mesh=mesh, in_specs=(chains, own, replicated), out_specs=(own, chains),
                         check_vma=False)


_PROGRAMS: dict = {}


def _start_program(key, dynamic, constraints, init, *, static, model, kernel, num_warmup, observed, latent,
                   init_strategy) -> StatesProgram:
    """One chain's start (a trace of the model, then `kernel.init`), traced once per
    signature: the same shapes with new values reuse it, and `_init`'s compiled program."""
    signature = (model, static, kernel, num_warmup, observed, latent, init_strategy, jax.config.jax_enable_x64,
                 jax.tree.structure((dynamic, constraints, init)),
                 tuple(jax.typeof(x) for x in jax.tree.leaves((key, dynamic, constraints, init))))
    if signature not in _PROGRAMS:
        def chain(batched, shared):
            k, start_values = batched
            dyn, cons = shared
            args = combine(dyn, static)
            k_generate, k_uniform = jax.random.split(k)
            start = ppl.handle(model, IMPROPER_START) if init_strategy == "uniform" else model
            trace, _ = start.generate(k_generate, cons.merge(start_values), args)
            if init_strategy == "uniform":
                given = set(observed) | set(start_values.addresses())
                u = to_unconstrained(model, args, trace.choices, given)
                drawn = {
                    a: jax.random.uniform(jax.random.fold_in(k_uniform, i), jnp.shape(u[a]), minval=-2.0, maxval=2.0)
                    for i, a in enumerate(latent) if a not in given
                }
                trace = to_constrained(model, args, u.merge(ppl.ChoiceMap(drawn)), given)
            return kernel.init(trace, observed=observed, num_warmup=num_warmup)

        _PROGRAMS[signature] = StatesProgram(chain, (key, init), (dynamic, constraints))
    return _PROGRAMS[signature]


_STEPPERS: dict = {}


def _step_program(program: StatesProgram, kernel: Kernel, collect, key, own, shared) -> StepProgram:
    """A chain's step (`kernel.step`, then what it records), traced once per start program."""
    if (program, kernel, collect) not in _STEPPERS:
        def step(k, state):
            state, info = kernel.step(k, state)
            return state, (collect(state.trace), info)

        _STEPPERS[program, kernel, collect] = StepProgram(step, program.layout, key, own, shared)
    return _STEPPERS[program, kernel, collect]


def _start(key, attempt, init, shared, *, program, stepper, num_chains):
    """`(own, k_run)`: the chains' starts, held as `stepper` steps them, and the key of
    their steps. Attempt 0 draws the first starts; attempt a > 0 redraws them all.
    Compiled for the default backend (`_start_for`)."""
    return _start_for(jax.default_backend())(key, attempt, init, shared, program=program, stepper=stepper,
                                             num_chains=num_chains)


# The start runs once per run, while the chunk program compiles in the background: on CPU
# it is compiled without LLVM's optimizations and with XLA's loop emitters, which cuts its
# compile from about 1.8 to 0.6 CPU-seconds (logistic regression, 4 chains; its run takes
# milliseconds either way), CPU time the two cores then give to the chunk's compile.
_START_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}}


@functools.cache
def _start_for(backend: str):
    return jax.jit(_start_chains, static_argnames=("program", "stepper", "num_chains"),
                   compiler_options=_START_OPTIONS.get(backend))


def _start_chains(key, attempt, init, shared, *, program, stepper, num_chains):
    k_init, k_run = jax.random.split(key)
    keys = jax.lax.cond(attempt == 0, lambda: jax.random.split(k_init, num_chains),
                        lambda: jax.random.split(jax.random.fold_in(k_init, attempt), num_chains))
    inits = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_chains,) + jnp.shape(x)), init)
    return stepper.adopt(program((keys, inits), shared), num_chains), k_run


def _host_broadcast(num_chains: int):
    """A leaf held once with a leading chain axis, for inspection: a zero-copy host view."""
    return lambda leaf: _through_host(leaf, lambda a: np.broadcast_to(a, (num_chains,) + a.shape))


_SITES: dict = {}


class _Survey(ppl.SiteHandler):
    def __init__(self):
        self.deterministic = []

    def process(self, site):
        if site.kind == "deterministic":
            self.deterministic.append(site.path)
        return site


def _sites(model, args, constraints, dynamic, static) -> tuple[tuple, tuple]:
    """`(latent, deterministic)` tuple paths of `model` given `constraints` (one abstract
    trace per signature, cached)."""
    signature = (model, static, jax.tree.structure(constraints),
                 tuple((jnp.shape(x), str(jnp.result_type(x))) for x in jax.tree.leaves((dynamic, constraints))))
    if signature not in _SITES:
        survey = _Survey()
        trace = jax.eval_shape(
            lambda dyn, cons: ppl.handle(model, survey, IMPROPER_START).generate(
                jax.random.key(0), cons, combine(dyn, static))[0],
            dynamic, constraints,
        )
        observed = set(constraints.addresses())
        latent = tuple(a for a in trace.choices.addresses() if a not in observed)
        _SITES[signature] = (latent, tuple(dict.fromkeys(survey.deterministic)))
    return _SITES[signature]


def _hmc_states(state) -> list:
    if isinstance(state, HMCState):
        return [state]
    if isinstance(state, CycleState):
        return [h for s in state.states for h in _hmc_states(s)]
    return []


_INIT_ATTEMPTS = 100


def _random_start(latent: tuple, init: ppl.ChoiceMap) -> bool:
    """Whether some latent choice's start is drawn (a retry can move it)."""
    given = set(init.addresses())
    return any(a not in given for a in latent)


def _bad_chains(states) -> np.ndarray:
    """[chains] bool: the start's log density, potential or gradient is not finite."""
    score = np.asarray(states.trace.score)
    bad = ~np.isfinite(score)
    for h in _hmc_states(states):
        bad |= ~np.isfinite(np.asarray(h.hmc.potential_energy))
        for g in _per_site(h.hmc.z_grad, h.moved, h.shapes, np).values():
            bad |= ~np.all(np.isfinite(np.asarray(g)).reshape(score.shape[0], -1), axis=1)
    return bad


def _check_initial(states, bad: np.ndarray, model, where: str, attempts: int) -> None:
    """Name the site when a chain starts at a non-finite log density (or gradient)."""
    if not bad.any():
        return
    score = np.asarray(states.trace.score)
    grads = [(address, np.all(np.isfinite(np.asarray(g)).reshape(score.shape[0], -1), axis=1))
             for h in _hmc_states(states)
             for address, g in _per_site(h.hmc.z_grad, h.moved, h.shapes, np).items()]
    tried = f" (after {attempts} random starts)" if attempts > 1 else ""
    c = int(np.argmax(bad))
    trace = jax.tree.map(lambda x: x[c], states.trace)
    culprits = []
    for address, s in model._site_scores(trace, ()):
        if not np.all(np.isfinite(np.asarray(s))):
            culprits.append(f"{format_address(address)} (log density {np.asarray(s)}, value {_value(trace, address)})")
    if culprits:
        raise ppl.InferenceError(
            f"{where}: chain {c} starts where the log density is {score[c]}{tried}: site(s) "
            f"{', '.join(culprits)}. "
            "Give valid starting values with init={...}, or check the model's parameters and factors "
            "(a log of a negative number, an observation outside the support)."
        )
    bad_grads = [format_address(a) for a, finite in grads if not finite[c]]
    raise ppl.InferenceError(
        f"{where}: chain {c} starts at log density {score[c]}{tried}, but the gradient "
        f"{'at ' + ', '.join(bad_grads) + ' ' if bad_grads else ''}(or the log-Jacobian on the real line) "
        "is not finite. Give valid starting values with init={...}, or reparameterize the site."
    )


def _value(trace, address):
    try:
        return np.asarray(trace[address])
    except ppl.PPLError:
        return "?"


def _progress(enabled, total: int, num_warmup: int, num_chains: int):
    return progress_bar(enabled, total, "warmup" if num_warmup else "sample", postfix=f"{num_chains} chains")
