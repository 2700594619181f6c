"""Sites and site handlers: the public seam for interpreting a model differently.

Every primitive call in a model body (`ppl.sample`, `ppl.factor`, `ppl.reward`,
`ppl.deterministic`) becomes a `Site` record. Before the running GFI method acts on it,
the record passes through the `SiteHandler`s installed with `ppl.handle`, innermost
first. A handler returns the site to act on, possibly with another distribution, another
given value or a scale; it never sees the method's internals. This is how code outside
`ppl/` reinterprets a model without editing the core: an unconstrained density for HMC
(replace each latent distribution by its image on the real line), tempering (scale the
likelihood sites), an estimator per site for VI (wrap the distribution), or a static
survey of a model's sites (record, return the site unchanged).

A handled generative function is itself a generative function: `ppl.handle(model, h)`
answers the whole GFI with `h` applied to every site of `model`, its nested calls and
combinators included, and can be jitted, vmapped and nested like any other.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

from ._errors import ArgumentError
from ._gfi import Combinator, GenerativeFunction
from ._trace import Trace

__all__ = ["Site", "SiteHandler", "handle", "HandledGF", "KINDS"]

KINDS = ("latent", "observed", "factor", "reward", "deterministic", "call")


class Site(NamedTuple):
    """One primitive call of a model body, as a `SiteHandler` sees it.

    Fields:
      kind:    "latent" (a random choice), "observed" (`obs=`), "factor", "reward",
               "deterministic" or "call" (a nested generative function).
      address: the site's address in its own model body (a string).
      path:    its full path below the handled generative function, a tuple of strings.
      fn:      the numpyro distribution (latent, observed), the generative function
               (call), the reward function (reward), or None.
      args:    a call's arguments, a reward's inputs, or ().
      value:   the value given to the site: the observation (observed), the constraint
               or choice the caller supplied (latent; None when it is to be sampled or
               kept from the previous trace), the log weight (factor), the value
               (deterministic), or None.
      scale:   a multiplier of the site's log density or log weight (1.0 by default).
      method:  the GFI method running: "simulate", "assess", "generate", "update" or
               "regenerate".
      to_model: latent sites only: None, or a function from the recorded value to the
               value the model body receives. With `fn` replaced by a distribution over
               another parameterization (`u` on the real line, say) and `to_model` the
               map back (`x = t(u)`), the trace records `u` and scores it under `fn`
               while the body goes on with `x` (a reparameterization).

    Handlers return `site._replace(...)` to change `fn`, `value`, `scale` or
    `to_model`; the other fields describe the call and are ignored if changed. Values inside `ppl.vmap` and
    `ppl.scan` are per element or per step (the mapped axis is not visible).
    """

    kind: str
    address: str
    path: tuple
    fn: Any
    args: tuple
    value: Any
    scale: Any
    method: str
    to_model: Any = None


class SiteHandler:
    """Base class of site handlers: override `process`.

    A handler must be a pure function of the site: it runs while JAX traces the model,
    possibly inside `jax.vmap` or `jax.lax.scan` bodies, so it must not keep traced
    values. Recording static facts (an address, a support, a shape) is fine.

    >>> import numpyro.distributions as dist, ppl
    >>> class Temper(SiteHandler):
    ...     def __init__(self, beta):
    ...         self.beta = beta
    ...     def process(self, site):
    ...         return site._replace(scale=self.beta) if site.kind == "observed" else site
    >>> @ppl.gen
    ... def model():
    ...     mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    ...     return ppl.sample("y", dist.Normal(mu, 1.0), obs=1.0)
    >>> tr = handle(model, Temper(0.5)).simulate(jax.random.key(0), ())
    >>> bool(abs(tr.score - dist.Normal(0.0, 1.0).log_prob(tr["mu"])
    ...          - 0.5 * dist.Normal(tr["mu"], 1.0).log_prob(1.0)) < 1e-5)
    True
    """

    def process(self, site: Site) -> Site:
        """Return the site the method should act on (by default, `site` unchanged)."""
        return site


# -- the handler stack ---------------------------------------------------------------------
_state = threading.local()


def _stack() -> list:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def apply_handlers(site: Site) -> Site:
    """Pass `site` through the installed handlers, innermost first.

    `site.path` is the full path from the outermost run; each handler sees it relative
    to the generative function it was installed on.
    """
    stack = _stack()
    if not stack:
        return site
    full = site.path
    for handler, depth in reversed(stack):
        site = handler.process(site._replace(path=full[depth:]))
        if not isinstance(site, Site):
            raise ArgumentError(
                f"{type(handler).__name__}.process must return a ppl.Site (site._replace(...)), "
                f"got {type(site).__name__}."
            )
    return site._replace(path=full)


class HandledGF(Combinator):
    """`gen_fn` with `handler` applied to each of its sites (see `handle`)."""

    def __init__(self, gen_fn: GenerativeFunction, handler: SiteHandler):
        self.gen_fn = gen_fn
        self.handler = handler
        self.__name__ = f"handle({gen_fn.__name__}, {type(handler).__name__})"

    def _parts(self):
        return (self.gen_fn, id(self.handler))  # the handler object itself, not its value

    def _check_arity(self, args, method):
        self.gen_fn._check_arity(args, method)

    def _within(self, f, *a):
        from ._interpreter import current_path

        stack = _stack()
        stack.append((self.handler, len(current_path())))
        try:
            return f(*a)
        finally:
            stack.pop()

    def _wrap(self, tr):
        return Trace(self, tr.args, tr.retval, tr.score, tr)

    def _simulate(self, key, args):
        return self._wrap(self._within(self.gen_fn._simulate, key, args))

    def _assess(self, choices, args):
        return self._within(self.gen_fn._assess, choices, args)

    def _generate(self, key, constraints, args):
        tr, w = self._within(self.gen_fn._generate, key, constraints, args)
        return self._wrap(tr), w

    def _update(self, key, trace, constraints, args):
        tr, w, discard = self._within(self.gen_fn._update, key, trace.inner, constraints, args)
        return self._wrap(tr), w, discard

    def _regenerate(self, key, trace, selection, args):
        tr, w = self._within(self.gen_fn._regenerate, key, trace.inner, selection, args)
        return self._wrap(tr), w

    def _project(self, trace, selection):
        return self.gen_fn._project(trace.inner, selection)

    def _choices(self, trace):
        return trace.inner.choices

    def _lookup(self, trace, path):
        return self.gen_fn._lookup(trace.inner, path)

    def _site_scores(self, trace, path):
        yield from self.gen_fn._site_scores(trace.inner, path)


def handle(gen_fn: GenerativeFunction, *handlers: SiteHandler) -> GenerativeFunction:
    """`gen_fn` reinterpreted: every site passes through `handlers` (first = innermost).

    The result is a generative function with the whole GFI; its traces hold the values
    and scores the handlers produced. `handle(gf, a, b)` is `handle(handle(gf, a), b)`:
    `a` sees each site first.
    """
    if not isinstance(gen_fn, GenerativeFunction):
        raise ArgumentError(f"ppl.handle expects a generative function, got {type(gen_fn).__name__}.")
    for h in handlers:
        if not isinstance(h, SiteHandler):
            raise ArgumentError(
                f"ppl.handle: {h!r} is not a ppl.SiteHandler; subclass it and override process(site)."
            )
        gen_fn = HandledGF(gen_fn, h)
    return gen_fn
