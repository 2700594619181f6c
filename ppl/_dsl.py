"""The modeling language: `@gen`, `sample`, `factor`, `reward`, `deterministic`.

A `@gen` function is ordinary traced JAX over numpyro distributions. Its GFI methods run
the body under a run of that method (`_interpreter.py`) that gives the primitives their
meaning; `_keys.py` holds the key scheme.
"""

from __future__ import annotations

import functools
import inspect
import os

import jax
import jax.numpy as jnp

from ._choicemap import ChoiceMap
from ._distribution import is_distribution, is_distribution_class
from ._errors import ArgumentError, UnknownAddressError, format_address
from ._gfi import GenerativeFunction
from ._interpreter import RUNS, current_run, in_model, run_body
from ._records import Choice, Deterministic, Factor, Observed, Reward, record_score, record_value, sum_terms
from ._trace import Trace

__all__ = ["gen", "sample", "factor", "reward", "deterministic", "GenFunction"]


# ----------------------------------------------------------------------------------------
# The user-facing primitives
# ----------------------------------------------------------------------------------------


def sample(address: str, fn, *args, obs=None):
    """A random choice at `address`.

    `fn` is a numpyro distribution (then `obs=value` makes it an always-observed site) or a
    generative function called with `*args`, whose choices nest under `address`. Returns
    the value (or the nested function's return value).
    """
    run = current_run("ppl.sample")
    run.claim(address, "ppl.sample")
    if is_distribution(fn):
        if args:
            raise ArgumentError(
                f"ppl.sample({address!r}, {type(fn).__name__}(...), ...): a distribution takes "
                "no extra arguments; put its parameters in the constructor."
            )
        return run.sample_distribution(address, fn, obs)
    if isinstance(fn, GenerativeFunction):
        if obs is not None:
            raise ArgumentError(
                f"ppl.sample({address!r}, {fn.__name__}, ...): obs= applies to distributions; "
                "constrain a nested generative function through the constraints of generate."
            )
        if not isinstance(args, tuple):
            args = tuple(args)
        try:
            fn._check_arity(args, "sample")
        except ArgumentError as e:
            raise ArgumentError(
                f"ppl.sample({address!r}, {fn.__name__}{', ...' if args else ''}): {e} Pass the "
                f"arguments after the generative function: ppl.sample({address!r}, {fn.__name__}, *args)."
            ) from None
        return run.call(address, fn, args)
    if is_distribution_class(fn):
        raise ArgumentError(
            f"ppl.sample({address!r}, {fn.__name__}): pass a distribution instance, e.g. "
            f"ppl.sample({address!r}, {fn.__name__}(...)) with its parameters."
        )
    raise ArgumentError(
        f"ppl.sample({address!r}, ...): expected a numpyro distribution or a generative "
        f"function, got {type(fn).__name__}."
    )


def factor(address: str, log_weight) -> None:
    """Add `log_weight` (summed if an array) to the score as soft evidence at `address`.

    Counted in `score`, `assess`, and the `generate`/`update` weights; no choice recorded.
    """
    run = current_run("ppl.factor")
    run.claim(address, "ppl.factor")
    site = run.site("factor", address, value=log_weight)
    run.add_factor(address, Factor(site.scale * jnp.sum(jnp.asarray(site.value, dtype=float))))


def deterministic(address: str, value):
    """Record `value` at `address` as a named derived quantity and return it.

    Not a random choice: no density, not in `trace.choices`, cannot be constrained;
    `trace[address]` reads it, and predictive and MCMC draws include it.

    >>> import numpyro.distributions as dist
    >>> @gen
    ... def model():
    ...     log_s = sample("log_s", dist.Normal(0.0, 1.0))
    ...     return deterministic("s", jnp.exp(log_s))
    >>> tr = model.simulate(jax.random.key(0), ())
    >>> bool(tr["s"] == jnp.exp(tr["log_s"])), sorted(tr.choices.addresses())
    (True, [('log_s',)])
    """
    run = current_run("ppl.deterministic")
    run.claim(address, "ppl.deterministic")
    site = run.site("deterministic", address, value=value)
    run.deterministic(address, site.value)
    return site.value


def _logit(r):
    # A reward of exactly 1 (or 0) would give a +inf (-inf) weight and NaN normalized
    # weights; clip to the float's resolution, i.e. log-odds of about +-16 in float32.
    eps = jnp.finfo(jnp.result_type(r, float)).eps
    r = jnp.clip(r, eps, 1.0 - eps)
    return jnp.log(r) - jnp.log1p(-r)


_LINKS = {"log": jnp.log, "logit": _logit}


def reward(address: str, reward_fn, *inputs, beta=1.0, link: str = "log") -> jax.Array:
    """A reward model as a likelihood: the factor `beta * link(reward_fn(*inputs))`.

    `reward_fn` returns a reward in (0, 1] (e.g. a process reward model's probability that
    a partial solution is correct). `link="log"` reads it as a likelihood (a reward of 0
    makes the trace impossible), `link="logit"` gives the log-odds weighting, with the
    reward clipped to [eps, 1 - eps] of its float type. Returns the reward.
    """
    if link not in _LINKS:
        raise ArgumentError(f"ppl.reward({address!r}, ...): link must be one of {sorted(_LINKS)}, got {link!r}")
    run = current_run("ppl.reward")
    run.claim(address, "ppl.reward")
    r = jnp.asarray(reward_fn(*inputs))
    site = run.site("reward", address, fn=reward_fn, args=inputs, value=r)
    r = jnp.asarray(site.value)
    log_weight = site.scale * jnp.sum(beta * _LINKS[link](r))
    run.add_factor(address, Reward(r, log_weight))
    return r


# ----------------------------------------------------------------------------------------
# The DSL generative function
# ----------------------------------------------------------------------------------------


class GenFunction(GenerativeFunction):
    """A Python function whose body calls `ppl.sample`/`ppl.factor`/`ppl.reward`."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)
        self._signature = inspect.signature(fn)
        try:
            self.location = f"{os.path.basename(inspect.getsourcefile(fn))}:{fn.__code__.co_firstlineno}"
        except (TypeError, AttributeError):
            self.location = "<unknown>"

    def __repr__(self):
        return f"<gen {self.__name__} at {self.location}>"

    def _check_arity(self, args, method):
        try:
            self._signature.bind(*args)
        except TypeError as e:
            raise ArgumentError(
                f"{self.__name__}{self._signature} cannot take {len(args)} argument(s): {e}."
            ) from None

    def __call__(self, *args):
        """Inside another model: run the body inline, its sites in the caller's namespace."""
        if not in_model():
            raise ArgumentError(
                f"{self.__name__} is a generative function; run it with "
                f"{self.__name__}.simulate(key, args) (or generate/assess/...). Inside a model, "
                f"ppl.sample('addr', {self.__name__}, *args) nests its choices under 'addr'."
            )
        return self.fn(*args)

    def _run(self, method: str, args: tuple, **kw):
        run = RUNS[method](self, **kw)
        retval = run_body(run, self.fn, args, method)
        return run, retval

    def _trace(self, run, args, retval):
        return Trace(self, args, retval, run.score(), run.records)

    def _simulate(self, key, args):
        run, retval = self._run("simulate", args, key=key)
        return self._trace(run, args, retval)

    def _assess(self, choices, args):
        run, retval = self._run("assess", args, given=choices)
        return run.score(), retval

    def _generate(self, key, constraints, args):
        run, retval = self._run("generate", args, key=key, given=constraints)
        return self._trace(run, args, retval), run.weight()

    def _update(self, key, trace, constraints, args):
        run, retval = self._run("update", args, key=key, given=constraints, old=trace.inner)
        return self._trace(run, args, retval), run.weight(), ChoiceMap(run.discard)

    def _regenerate(self, key, trace, selection, args):
        run, retval = self._run("regenerate", args, key=key, old=trace.inner, selection=selection)
        return self._trace(run, args, retval), run.weight()

    _score_derivable = True

    def _score_from_inner(self, inner):
        return sum_terms(record_score(rec) for rec in inner.values())

    def _project(self, trace, selection):
        terms = []
        for address, rec in trace.inner.items():
            if isinstance(rec, Trace):
                terms.append(rec.gen_fn._project(rec, selection.submap(address)))
            elif isinstance(rec, Choice):
                if address in selection:
                    terms.append(rec.score)
            else:
                terms.append(record_score(rec))
        return sum_terms(terms)

    def _choices(self, trace):
        out = {}
        for address, rec in trace.inner.items():
            if isinstance(rec, Choice):
                out[address] = rec.value
            elif isinstance(rec, Trace):
                sub = rec.choices
                if not sub.is_empty:
                    out[address] = sub
        return ChoiceMap(out)

    def _lookup(self, trace, path):
        rec = trace.inner.get(path[0]) if path else None
        if isinstance(rec, Trace) and len(path) > 1:
            return rec.gen_fn._lookup(rec, path[1:])
        if isinstance(rec, (Observed, Factor, Reward, Deterministic)) and len(path) == 1:
            return record_value(rec)
        named = [(a,) for a in trace.inner]
        raise UnknownAddressError(
            f"{self.__name__}: the trace has no value at {format_address(path)}. Its addresses: "
            f"{', '.join(format_address(a) for a in named) or '(none)'}."
        )

    def _site_scores(self, trace, path):
        for address, rec in trace.inner.items():
            if isinstance(rec, Trace):
                yield from rec.gen_fn._site_scores(rec, path + (address,))
            elif not isinstance(rec, Deterministic):
                yield path + (address,), record_score(rec)


def gen(fn) -> GenFunction:
    """Decorator: a Python function using `ppl.sample`/`factor`/`reward` -> generative function.

    >>> import numpyro.distributions as dist
    >>> @gen
    ... def coin():
    ...     p = sample("p", dist.Beta(1.0, 1.0))
    ...     return sample("flip", dist.Bernoulli(p))
    >>> tr = coin.simulate(jax.random.key(0), ())
    >>> sorted(tr.choices.addresses())
    [('flip',), ('p',)]
    """
    if isinstance(fn, GenerativeFunction):
        return fn
    if not callable(fn):
        raise ArgumentError(f"@ppl.gen decorates a function, got {type(fn).__name__}")
    return GenFunction(fn)
