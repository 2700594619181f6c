"""The modeling language: `@gen`, `sample`, `factor`, `reward`.

A `@gen` function is ordinary traced JAX over numpyro distributions. Its GFI methods run
the body under a handler (`_handler.py`) that gives the primitives the meaning of the
method. See `_handler.py` for the trace layout and the key scheme.
"""

from __future__ import annotations

import functools
import inspect
import os

import jax
import jax.numpy as jnp

from ._choicemap import ChoiceMap
from ._distribution import is_distribution, is_distribution_class
from ._errors import ArgumentError
from ._gfi import GenerativeFunction
from ._handler import (
    Factor,
    Handler,
    Observed,
    Reward,
    Site,
    current_handler,
    in_model,
    record_score,
    run_handler,
    sum_terms,
)
from ._trace import Trace

__all__ = ["gen", "sample", "factor", "reward", "GenFunction"]


# ----------------------------------------------------------------------------------------
# The user-facing primitives
# ----------------------------------------------------------------------------------------


def sample(address: str, fn, *args, obs=None):
    """A random choice at `address`.

    `fn` is a numpyro distribution (then `obs=value` makes it an always-observed site) or a
    generative function called with `*args`, whose choices nest under `address`. Returns
    the value (or the nested function's return value).
    """
    handler = current_handler("ppl.sample")
    handler.claim(address, "ppl.sample")
    if is_distribution(fn):
        if args:
            raise ArgumentError(
                f"ppl.sample({address!r}, {type(fn).__name__}(...), ...): a distribution takes "
                "no extra arguments; put its parameters in the constructor."
            )
        return handler.sample_distribution(address, fn, obs)
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
        return handler.call(address, fn, args)
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
    handler = current_handler("ppl.factor")
    handler.claim(address, "ppl.factor")
    handler.add_factor(address, Factor(jnp.sum(jnp.asarray(log_weight, dtype=float))))


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
        raise ValueError(f"ppl.reward({address!r}, ...): link must be one of {sorted(_LINKS)}, got {link!r}")
    handler = current_handler("ppl.reward")
    handler.claim(address, "ppl.reward")
    r = jnp.asarray(reward_fn(*inputs))
    log_weight = jnp.sum(beta * _LINKS[link](r))
    handler.add_factor(address, Reward(r, log_weight))
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

    def _run(self, handler: Handler, args: tuple, method: str):
        return run_handler(handler, self.fn, args, method)

    def _trace(self, handler, args, retval):
        return Trace(self, args, retval, handler.score(), handler.records)

    def _simulate(self, key, args):
        h = Handler(self, "simulate", key=key)
        retval = self._run(h, args, "simulate")
        return self._trace(h, args, retval)

    def _assess(self, choices, args):
        h = Handler(self, "assess", constraints=choices)
        retval = self._run(h, args, "assess")
        return h.score(), retval

    def _generate(self, key, constraints, args):
        h = Handler(self, "generate", key=key, constraints=constraints)
        retval = self._run(h, args, "generate")
        return self._trace(h, args, retval), h.weight()

    def _update(self, key, trace, constraints, args):
        h = Handler(self, "update", key=key, constraints=constraints, old=trace.inner)
        retval = self._run(h, args, "update")
        return self._trace(h, args, retval), h.weight(), ChoiceMap(h.discard)

    def _regenerate(self, key, trace, selection, args):
        h = Handler(self, "regenerate", key=key, old=trace.inner, selection=selection)
        retval = self._run(h, args, "regenerate")
        return self._trace(h, args, retval), h.weight()

    def _project(self, trace, selection):
        terms = []
        for address, rec in trace.inner.items():
            if isinstance(rec, Trace):
                terms.append(rec.gen_fn._project(rec, selection.submap(address)))
            elif isinstance(rec, Site):
                if address in selection:
                    terms.append(rec.score)
            else:
                terms.append(record_score(rec))
        return sum_terms(terms)

    def _choices(self, trace):
        out = {}
        for address, rec in trace.inner.items():
            if isinstance(rec, (Site, Observed)):
                out[address] = rec.value
            elif isinstance(rec, Trace):
                sub = rec.choices
                if not sub.is_empty:
                    out[address] = sub
        return ChoiceMap(out)

    def _site_scores(self, trace, path):
        for address, rec in trace.inner.items():
            if isinstance(rec, Trace):
                yield from rec.gen_fn._site_scores(rec, path + (address,))
            else:
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
        raise TypeError(f"@ppl.gen decorates a function, got {type(fn).__name__}")
    return GenFunction(fn)
