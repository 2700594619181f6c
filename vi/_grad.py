"""`vi.grad`: unbiased gradients of objectives written as programs.

An objective is `f(key, params) -> scalar` whose expectation over `key` is the bound
to maximize. It draws from guides (and models) through the constructs `vi.simulate`
and `vi.generate`; every random site there carries a gradient estimator (see
`_estimators.py`). `grad(objective)` returns `(key, params) -> (value, grads)`.

How the estimate is built (and why it is unbiased). Write the objective's expectation
by the chain rule over its random sites, taken in the order the program draws them:
the gradient is the explicit derivative of `f` at the drawn values, plus, for each site
whose distribution depends on the parameters, the derivative of that distribution.
Each estimator supplies an unbiased estimate of its site's term, given what was drawn
before it, so their sum is unbiased:

- reparam: the draw is a differentiable function of the parameters, and autodiff of
  `f` through it is the pathwise term (plus the explicit derivative).
- reinforce: the draw is cut from autodiff; the term is `(f - b) grad log q(x)`. It is
  added as the zero-valued surrogate `stop_gradient(f - b) * (log q - stop_gradient(log q))`,
  the construct of DiCE (Foerster et al. 2018), whose value is 0 and whose gradient is
  the term.
- enum: the sites' expectation is a finite sum, `sum_c q(c) E[f | c]`. The objective
  is re-run (vectorized) with the enumerated sites given each joint value `c` and the
  same key, and `sum_c q(c) S_c` is differentiated, where `S_c` is the re-run's own
  surrogate: its gradient is `sum_c grad q(c) f_c + q(c) grad S_c`, unbiased term by
  term.
- rsvi: the draw is the accepted proposal `h(eps, theta)` of a rejection sampler at fixed
  noise (pathwise, like reparam), and the acceptance step adds the score-function term
  `f grad log pi(eps; theta)` of the accepted noise's density `pi`. The construct runs
  the guide a second time, every choice given its value, with each rsvi site drawing
  its noise again from the same key and scored by `log pi` (`_rsvi.py`); those scores
  join the reinforce terms.
- mvd: for a coordinate `x_j`, `d/dtheta E f = sum_k d/dtheta q_j(k) E[f | x_j = k]`
  (finite support) or its weak-derivative decomposition (Poisson, geometric), with
  `q_j` the coordinate's pmf given what was drawn before it. The objective is re-run
  with the same key and `x_j` moved; what the program draws after `x_j` is drawn afresh
  given the moved value, including the later steps of the same site inside `ppl.scan`
  (which depend on it), and what it drew before is kept. Each re-run is then an
  unbiased estimate of `E[f | x_j = k]` given the earlier draws, and the zero-valued
  surrogate `sum_k q_j(k) stop_gradient(f_k) - stop_gradient(...)` adds the term;
  `q_j(k)` is read, differentiably, from a scoring run of the guide at the first run's
  values. Details and the argument in `_mvd.py`.

A reinforce baseline `b` only has to be independent of its site's draw: a constant, the
leave-one-out mean of independent copies, or a moving average of the objective's values
at past optimization steps (`baseline="moving_average"`). The average is state outside
the pure `(key, params)` function: `vi.stateful_grad` takes it in and returns it
updated with this step's value, and `vi.fit` threads it through its scan; the estimate
at step t reads only steps before t, so it stays unbiased.

Re-running with the same key is what a continuation is here: the objective is a pure
function of `(key, params)`, so a re-run repeats every draw made before the moved site
exactly, and later draws are valid draws given the moved value (common random numbers,
which keep the variance low). Nothing is special-cased per objective, and a new
estimator is a new case in `_estimators.site_info` plus its surrogate term here.

The constructs report to the running estimate through a tape that lives for one
evaluation of the objective. They must run at the objective's level: inside `jax.vmap`
or `jax.lax.scan` of the objective's own code they would hand the tape traced values
of an inner transformation. Batch with `num_particles=` (constructs) or with `ppl.vmap`
/ `ppl.scan` inside the guide, which the core stacks in one trace.
"""

from __future__ import annotations

import itertools
import math
import threading

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import ppl
from ppl.extend import check_count, check_key, format_address, site_scores

from ._estimators import MAX_ENUMERATION, SiteInfo, site_info
from ._mvd import Continuation, mvd_terms
from ._rsvi import noise_scores

__all__ = ["grad", "simulate", "generate", "learning_signal"]

_state = threading.local()
sg = jax.lax.stop_gradient


def _tapes() -> list:
    if not hasattr(_state, "tapes"):
        _state.tapes = []
    return _state.tapes


def current_tape():
    tapes = _tapes()
    return tapes[-1] if tapes else None


class _Tape:
    """What one evaluation of an objective reports: per construct call (numbered in
    call order) its sites' estimators, and the surrogate pieces."""

    def __init__(self, forced=None, baselines=None, continued=frozenset()):
        self.forced = forced or {}  # (construct index, path) -> full value
        # (construct index, path) of the mvd site whose forced entry is a continuation
        # (`_mvd.Continuation`'s packed array), not a value
        self.continued = continued
        self.baselines = baselines or {}  # site label -> moving-average baseline (a scalar)
        self.averaged: dict = {}  # site label -> decay, for the moving-average sites seen
        self.sampled_rsvi: dict = {}  # construct index -> paths of its drawn rsvi sites
        self.sampled_mvd: set = set()  # (construct index, path) of drawn mvd sites
        self.count = 0
        self.infos: dict = {}  # construct index -> {path: SiteInfo}
        self.values: dict = {}  # (index, path) -> drawn value (enum and mvd sites)
        self.scores: dict = {}  # (index, path) -> site log density (enum sites)
        self.calls: dict = {}  # construct index -> (gen_fn, key, args, num_particles), mvd
        self.traces: dict = {}  # construct index -> its trace, for constructs with mvd sites
        # per construct call: its reinforce sites' zero-valued terms log q - sg(log q),
        # per particle ([K] or []), grouped by baseline: "plain" (0 or a constant),
        # "const" (b * term for constant baselines b), "loo" (leave-one-out)
        self.terms: dict = {}
        self.signals: dict = {}  # construct index -> learning signal set by learning_signal
        self.trace_index: dict = {}  # id(trace) -> construct index
        self.has_loo = False
        self._open = None

    def __enter__(self):
        _tapes().append(self)
        return self

    def __exit__(self, *exc):
        _tapes().pop()

    def note(self, path, info: SiteInfo, sampled: bool):
        if self._open is None:
            return
        if info.estimator == "rsvi" and sampled:
            self.sampled_rsvi.setdefault(self._open, set()).add(path)
        if info.estimator == "mvd" and sampled:  # a given value has no sampling derivative
            self.sampled_mvd.add((self._open, path))
        known = self.infos[self._open].get(path)
        if known is not None and known != info:
            raise ppl.ArgumentError(
                f"vi: site {format_address(path)} is drawn with two different estimators in one "
                f"construct call ({known.estimator} and {info.estimator})."
            )
        self.infos[self._open][path] = info

    def open(self) -> int:
        index = self.count
        self.count += 1
        self.infos[index] = {}
        self._open = index
        return index

    def is_continued(self, path) -> bool:
        """Whether the open construct's site at `path` is an mvd re-run's continuation."""
        return self._open is not None and (self._open, path) in self.continued

    def close(self, index, trace, call, noise_scores: dict):
        """Collect the construct call's terms. `call`: `(gen_fn, key, args,
        num_particles)`; `noise_scores`: rsvi path -> log density of its accepted noise
        (`[K]` per particle when batched)."""
        batched = call[3] is not None
        self._open = None
        infos = self.infos[index]
        if not infos:
            return
        scores = site_scores(trace)
        choices = trace.choices
        self.trace_index[id(trace)] = index
        terms = {"plain": 0.0, "const": 0.0, "loo": 0.0}
        for path, info in infos.items():
            score = scores.get(path)
            if score is None:
                continue
            key = (index, path)
            if info.estimator == "reinforce":
                delta = score - sg(score)
                if info.baseline == "leave_one_out":
                    terms["loo"] = terms["loo"] + delta
                    self.has_loo = True
                else:
                    terms["plain"] = terms["plain"] + delta
                    if info.baseline == "moving_average":
                        label = site_label(index, path)
                        self.averaged[label] = info.decay
                        if label in self.baselines:
                            terms["const"] = terms["const"] + sg(self.baselines[label]) * delta
                    elif info.baseline is not None:
                        terms["const"] = terms["const"] + info.baseline * delta
            elif info.estimator == "enum":
                self.scores[key] = jnp.sum(score) if batched else score
                self.values[key] = choices[path]
            elif info.estimator == "mvd" and key in self.sampled_mvd:
                self.values[key] = choices[path]
                self.calls[index], self.traces[index] = call, trace
        for noise in noise_scores.values():  # rsvi: the acceptance step's score term
            terms["plain"] = terms["plain"] + noise - sg(noise)
        self.terms[index] = terms

    def surrogate(self, f):
        """(A, B): A has value f and the gradient of every reinforce term with the
        leave-one-out baseline at 0; B is the leave-one-out sites' zero-valued term, so
        the full surrogate is A - b * B for the baseline b."""
        fs = sg(f)
        a, b = f, jnp.zeros(())
        for index, t in self.terms.items():
            signal = self.signals.get(index)
            if signal is not None:
                a = a + jnp.sum(sg(signal) * (t["plain"] + t["loo"]))
                continue
            a = a + fs * jnp.sum(t["plain"] + t["loo"]) - jnp.sum(t["const"])
            b = b + jnp.sum(t["loo"])
        return a, b


def site_label(index: int, path: tuple) -> str:
    """The name of a site's moving-average state: construct call number and path."""
    return f"{index}:{'/'.join(path)}"


class _Estimators(ppl.SiteHandler):
    """Unwraps each latent site's estimator and tells the running tape about it."""

    def process(self, site):
        if site.kind != "latent":
            return site
        d, info = site_info(site)
        tape = current_tape()
        if tape is not None:
            tape.note(site.path, info, site.value is None)
            if site.value is not None and tape.is_continued(site.path):
                # an mvd re-run: the site is drawn, some coordinates given (`_mvd.py`)
                return site._replace(fn=Continuation(d, site.value), value=None)
        return site._replace(fn=d)


_HANDLER = _Estimators()  # one instance: equal handled functions hit jit caches


def _handled(gen_fn):
    if not isinstance(gen_fn, ppl.GenerativeFunction):
        raise ppl.ArgumentError(f"vi constructs take a generative function, got {type(gen_fn).__name__}.")
    return ppl.handle(gen_fn, _HANDLER)


def _run_construct(name, gen_fn, key, constraints, args, num_particles, detach=False):
    """Shared body of `simulate` and `generate`: (trace, weight)."""
    check_key(key, None, f"vi.{name}")
    if not isinstance(args, tuple):
        raise ppl.ArgumentError(f"vi.{name}: args must be a tuple, got {type(args).__name__}.")
    handled = _handled(gen_fn)
    tape = None if detach else current_tape()
    index = tape.open() if tape is not None else None
    forced = {} if tape is None else {p: v for (i, p), v in tape.forced.items() if i == index}
    given = ppl.ChoiceMap.of(constraints) if constraints is not None else ppl.ChoiceMap()

    def one(k, forced_k):
        g = given.merge(ppl.ChoiceMap(forced_k)) if forced_k else given
        if g.is_empty and name == "simulate":
            trace, weight = handled.simulate(k, args), jnp.zeros(())
        else:
            trace, weight = handled.generate(k, g, args)
        rsvi_paths = tape.sampled_rsvi.get(index) if tape is not None else None
        noise = noise_scores(gen_fn, k, trace, args, rsvi_paths) if rsvi_paths else {}
        return trace, weight, noise

    try:
        if num_particles is None:
            trace, weight, noise = one(key, forced)
        else:
            n = check_count(num_particles, "num_particles", f"vi.{name}")
            particle = lambda i, fk: one(ppl.particle_key(key, i), fk)  # noqa: E731
            trace, weight, noise = jax.vmap(particle)(jnp.arange(n), forced)
    finally:
        if tape is not None:
            tape._open = None
    if tape is not None:
        tape.close(index, trace, (gen_fn, key, args, num_particles), noise)
    if detach:
        trace, weight = jax.lax.stop_gradient((trace, weight))
    return trace, weight


def simulate(gen_fn, key, args: tuple = (), num_particles: int | None = None, *, detach: bool = False) -> ppl.Trace:
    """Run `gen_fn` forward inside an objective, each site under its gradient estimator.

    Returns the trace (with `num_particles=K`, a batch of K traces, leaves `[K, ...]`,
    drawn with `ppl.particle_key(key, i)`). Outside `vi.grad` it is `gen_fn.simulate`
    with the estimator wrappers removed. With `detach=True` the draws are data: the
    trace carries no gradient and its sites add no estimator terms (the samples of
    wake-sleep updates, or of a fixed proposal).
    """
    trace, _ = _run_construct("simulate", gen_fn, key, None, args, num_particles, detach)
    return trace


def generate(gen_fn, key, constraints, args: tuple = (), num_particles: int | None = None, *,
             detach: bool = False):
    """`gen_fn.generate(key, constraints, args)` inside an objective: `(trace, weight)`,
    the unconstrained sites drawn under their gradient estimators (with
    `num_particles=K`, K traces and weights `[K]`; `detach` as in `simulate`)."""
    return _run_construct("generate", gen_fn, key, constraints, args, num_particles, detach)


def learning_signal(trace, signal) -> None:
    """Give the reinforce sites of `trace` (returned by a vi construct in this
    objective) the learning signal `signal` instead of the objective's value.

    For a batch of K traces (`num_particles=K`), `signal` is `[K]`: particle k's sites
    get `signal[k] * grad log q(x_k)`. The estimate stays unbiased when `signal[k]` is
    the objective minus a baseline that does not depend on particle k's draws (VIMCO's
    leave-one-out bound is one); the signal is not differentiated.
    """
    tape = current_tape()
    if tape is None:
        return
    index = tape.trace_index.get(id(trace))
    if index is None:
        raise ppl.ArgumentError(
            "vi.learning_signal: the trace was not returned by vi.simulate / vi.generate in this objective."
        )
    terms = tape.terms.get(index)
    if terms is None or all(isinstance(t, float) for t in terms.values()):
        return  # no reinforce site in that call: nothing to signal
    signal = jnp.asarray(signal)
    shape = jnp.shape(terms["plain"] if not isinstance(terms["plain"], float) else terms["loo"])
    if signal.shape != shape and signal.shape != ():
        raise ppl.ArgumentError(
            f"vi.learning_signal: the signal has shape {signal.shape}, the trace's batch is {shape}."
        )
    tape.signals[index] = signal


# ----------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------


def _evaluate(objective, key, params, forced, baselines=None, continued=frozenset()):
    """One run of the objective under a tape: (f, tape)."""
    with _Tape(forced, baselines, continued) as tape:
        f = objective(key, params)
    f = jnp.asarray(f)
    if f.shape != () or not jnp.issubdtype(f.dtype, jnp.floating):
        raise ppl.ArgumentError(
            f"vi.grad: the objective must return a float scalar, got shape {f.shape} dtype {f.dtype}."
        )
    return f, tape


def discover(objective, key, params):
    """What the objective's sites need (static): its enum and mvd sites {(index, path):
    (info, shape)}, whether a reinforce site has a leave-one-out baseline, and the
    moving-average sites {label: decay}."""
    found, loo, averaged = {}, [], {}

    def probe(k, p):
        f, tape = _evaluate(objective, k, p, {})
        loo.append(tape.has_loo)
        averaged.update(tape.averaged)
        for (index, path), value in tape.values.items():
            shape = jax.ShapeDtypeStruct(jnp.shape(value), jnp.result_type(value))
            found[(index, path)] = (tape.infos[index][path], shape)
        return f

    jax.eval_shape(lambda k: probe(k, params), key)  # params closed over: static leaves stay static
    return found, loo[0], averaged


def _estimate(objective, key, params, sites, baselines):
    """(f, A, B) for one independent copy, enum sites summed exactly."""
    enum_sites = {k: v for k, v in sites.items() if v[0].estimator == "enum"}
    mvd_sites = {k: v for k, v in sites.items() if v[0].estimator == "mvd"}

    def at(forced):
        f, tape = _evaluate(objective, key, params, forced, baselines)
        a, b = tape.surrogate(f)
        if mvd_sites:

            def rerun(site_key, packed):
                moved = {**forced, site_key: packed}
                return _evaluate(objective, key, params, moved, continued=frozenset([site_key]))[0]

            a = a + mvd_terms(rerun, key, tape, f, mvd_sites)
        logq = sum((tape.scores[k] for k in enum_sites), jnp.zeros(()))
        return f, a, b, logq

    if not enum_sites:
        f, a, b, _ = at({})
        return f, a, b
    configs = _joint_values(enum_sites)
    f_c, a_c, b_c, logq_c = jax.vmap(at)(configs)
    q = jnp.exp(logq_c)
    return jnp.sum(sg(q) * f_c), jnp.sum(q * a_c), jnp.sum(q * b_c)


def _joint_values(enum_sites) -> dict:
    """Every joint value of the enumerated sites: {(index, path): [C, *shape]}."""
    sizes, total = [], 1
    for (index, path), (info, shape) in enum_sites.items():
        positions = math.prod(shape.shape)
        sizes.append((info, shape, positions))
        total *= info.size ** positions
        if total > MAX_ENUMERATION:
            raise ppl.ArgumentError(
                f"vi.enum: the enumerated sites ({', '.join(format_address(p) for _, p in enum_sites)}) "
                f"have more than {MAX_ENUMERATION} joint values ({format_address(path)} alone has "
                f"{info.size}^{positions}). Use vi.mvd (one re-run per coordinate and value) or "
                "vi.reinforce for sites with many coordinates."
            )
    grids = [range(info.size) for info, _, pos in sizes for _ in range(pos)]
    table = np.array(list(itertools.product(*grids)), dtype=np.int64).reshape(total, -1)
    out, col = {}, 0
    for (key, (info, shape)), (_, _, positions) in zip(enum_sites.items(), sizes):
        block = table[:, col : col + positions] + info.low
        out[key] = jnp.asarray(block.reshape((total,) + tuple(shape.shape)), dtype=shape.dtype)
        col += positions
    return out


def is_float_leaf(x) -> bool:
    """A leaf that params differentiate: a floating-point array or a Python float."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return bool(jnp.issubdtype(x.dtype, jnp.inexact))
    return isinstance(x, float)


def grad(objective, num_samples: int = 1):
    """`(key, params) -> (value, grads)`: an unbiased estimate of `E[objective(key, params)]`
    over the key, and of its gradient in `params` (a pytree; grads has its structure,
    with None at leaves that are not floating-point arrays, such as an equinox
    module's activation functions).

    With `num_samples=K` the objective runs K times with independent keys (vectorized)
    and the estimates are averaged; reinforce sites with `baseline="leave_one_out"` then
    use the mean of the other K - 1 runs as their baseline (unbiased: independent of the
    site's own draw). Reinforce sites with `baseline="moving_average"` need the values
    of past steps, which this stateless function does not have: here their baseline is
    0; `vi.stateful_grad` (and `vi.fit`, which uses it) carries the average.

    >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, ppl, vi
    >>> @ppl.gen
    ... def guide(mu):
    ...     return ppl.sample("x", dist.Normal(mu, 1.0))
    >>> def objective(key, mu):            # E[-x^2], x ~ N(mu, 1): -(mu^2 + 1)
    ...     x = vi.simulate(guide, key, (mu,))["x"]
    ...     return -x ** 2
    >>> value, g = vi.grad(objective, num_samples=1000)(jax.random.key(0), 1.5)
    >>> bool(abs(g - (-3.0)) < 0.2)       # d/dmu = -2 mu
    True
    """
    estimate = value_and_grad_with_baselines(objective, num_samples)

    def value_and_grad(key, params):
        f, g, _ = estimate(key, params, lambda averaged: {})
        return f, g

    return value_and_grad


def value_and_grad_with_baselines(objective, num_samples: int = 1):
    """`(key, params, baseline_values) -> (value, grads, averaged)`: `grad`'s estimate
    with the moving-average sites' baselines supplied. `baseline_values(averaged)`
    receives those sites (`averaged`, `{site label: decay}`, static, found by tracing the
    objective) and returns `{site label: scalar baseline}` (a missing label means 0).
    `vi.stateful_grad` keeps the averages."""
    if not callable(objective):
        raise ppl.ArgumentError(f"vi.grad expects a function objective(key, params), got {type(objective).__name__}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ppl.ArgumentError(f"vi.grad: num_samples must be a positive int, got {num_samples!r}.")
    num_samples = int(num_samples)

    def estimate(key, params, baseline_values):
        check_key(key, None, "vi.grad")
        sites, has_loo, averaged = discover(objective, key, params)
        if has_loo and num_samples == 1:
            raise ppl.ArgumentError(
                "vi.grad: a reinforce site has baseline='leave_one_out', which needs "
                "vi.grad(objective, num_samples=K) with K >= 2 independent runs."
            )
        baselines = baseline_values(averaged)

        def surrogate(p):
            if num_samples == 1:
                f, a, b = _estimate(objective, key, p, sites, baselines)
                return a, f
            keys = jax.random.split(key, num_samples)
            f, a, b = jax.vmap(lambda k: _estimate(objective, k, p, sites, baselines))(keys)
            loo = (jnp.sum(f) - f) / (num_samples - 1)
            return jnp.mean(a - sg(loo) * b), jnp.mean(f)

        # differentiate the floating-point arrays of params (an equinox module's
        # functions and ints are static; their gradient entries are None, as in equinox)
        diff, static = eqx.partition(params, is_float_leaf)
        try:
            (_, f), g = jax.value_and_grad(lambda d: surrogate(eqx.combine(d, static)), has_aux=True)(diff)
        except jax.errors.UnexpectedTracerError as e:
            raise ppl.ArgumentError(
                "vi.grad: a vi construct (vi.simulate / vi.generate) ran inside jax.vmap, "
                "jax.lax.scan or another transformation of the objective's own code, so its "
                "gradient terms could not reach the estimate. Use num_particles=K on the "
                "construct, or ppl.vmap / ppl.scan inside the generative function."
            ) from e
        return f, g, averaged

    return estimate
