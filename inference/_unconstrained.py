"""A model's density on the unconstrained space, built from outside the core with site handlers.

HMC and NUTS move on R^d, but a model's latent choices live in their supports (a scale
is positive, a probability vector lies on the simplex). Each latent site is mapped
through numpyro's bijection `t = biject_to(support)` from the real line: a value `u` on
the real line stands for the choice `x = t(u)`, and the density of `u` is
`p(t(u)) |det J_t(u)|` (change of variables). Nothing here touches the core: three
`ppl.SiteHandler`s reinterpret the latent sites of any model, nested calls and
combinators included, through the public `ppl.handle`:

- `unconstrained(model)`: each latent distribution replaced by its image on the real
  line (`TransformedDistribution(d, t.inv)`), the trace recording `u` while the model
  body goes on with `t(u)`; its `assess(u, args)` is the log density HMC needs, and
  `jax.grad` of it is the potential's gradient;
- `to_unconstrained(model, args, choices)`: constrained choices `x` -> `u = t^-1(x)`;
- `to_constrained(model, args, u)`: the model's trace at `x = t(u)`, deterministic
  sites included (what MCMC draws report).

A discrete latent site has no bijection to the real line: it is an `ArgumentError`
naming the site, with the fix (enumerate it, or give it a Gibbs kernel).

Each function takes `fixed`: addresses of random choices that stay in their own space
(observations given as constraints, or choices another MCMC kernel updates). Their
values are given, their log density is counted as is, and a discrete one is allowed.
"""

from __future__ import annotations

import functools

import jax
import numpyro.distributions as dist
from numpyro.distributions.transforms import biject_to

import ppl

__all__ = ["unconstrained", "to_unconstrained", "to_constrained"]


def _bijection(site: ppl.Site):
    d = site.fn
    if d.support.is_discrete:
        raise ppl.ArgumentError(
            f"latent site {site.path!r} is discrete ({type(d).__name__}, support {d.support}); "
            "gradient-based samplers need continuous sites. Condition on it, marginalize it "
            "by enumeration, or update it with a Gibbs kernel."
        )
    return biject_to(d.support)


class _OnRealLine(ppl.SiteHandler):
    """Latent distributions replaced by their images on the real line; a given
    constrained value is first mapped there when `from_constrained`. Sites whose path
    is in `fixed` are left alone."""

    def __init__(self, from_constrained: bool = False, fixed: frozenset = frozenset()):
        self.from_constrained = from_constrained
        self.fixed = fixed

    def process(self, site):
        if site.kind != "latent" or site.path in self.fixed:
            return site
        t = _bijection(site)
        value = site.value
        if value is not None and self.from_constrained:
            value = t.inv(value)
        return site._replace(fn=dist.TransformedDistribution(site.fn, t.inv), value=value, to_model=t)


class _Constrain(ppl.SiteHandler):
    """A given latent value on the real line mapped into the site's support (sites
    whose path is in `fixed` are left alone)."""

    def __init__(self, fixed: frozenset = frozenset()):
        self.fixed = fixed

    def process(self, site):
        if site.kind != "latent" or site.value is None or site.path in self.fixed:
            return site
        return site._replace(value=_bijection(site)(site.value))


# One handler instance per (kind, fixed set): `ppl.handle` compares handlers by
# identity, so equal requests give equal generative functions (and jit cache hits).
@functools.lru_cache(maxsize=None)
def _handler(kind: str, fixed: frozenset) -> ppl.SiteHandler:
    if kind == "constrain":
        return _Constrain(fixed)
    return _OnRealLine(from_constrained=kind == "from_constrained", fixed=fixed)


def _fixed_paths(fixed) -> frozenset:
    """Addresses (strings, tuple paths, or a choice map's addresses) as tuple paths."""
    if fixed is None:
        return frozenset()
    if isinstance(fixed, (ppl.ChoiceMap, dict)):
        return frozenset(ppl.ChoiceMap.of(fixed).addresses())
    if isinstance(fixed, str):
        fixed = (fixed,)
    return frozenset((a,) if isinstance(a, str) else tuple(a) for a in fixed)


def unconstrained(model: ppl.GenerativeFunction, fixed=None) -> ppl.GenerativeFunction:
    """`model` with every latent choice on the real line.

    `unconstrained(model).assess(u, args)[0]` = log p(t(u), evidence) + log|det J_t(u)|,
    summed over sites (the negative potential energy of HMC). Its `simulate` draws
    `u = t^-1(x)` with `x` from the prior.

    >>> import numpyro.distributions as dist
    >>> @ppl.gen
    ... def model():
    ...     return ppl.sample("s", dist.Exponential(1.0))
    >>> lp, _ = unconstrained(model).assess({"s": 0.0}, ())   # s = exp(0) = 1
    >>> round(float(lp), 4)  # log Exp(1 | 1) + log|d exp(u)/du| at u = 0
    -1.0
    """
    return ppl.handle(model, _handler("on_real_line", _fixed_paths(fixed)))


def to_unconstrained(model: ppl.GenerativeFunction, args: tuple, choices, fixed=None) -> ppl.ChoiceMap:
    """The real-line values `u = t^-1(x)` of constrained `choices` (every latent choice).

    Shapes follow the bijections: a K-simplex value maps to K - 1 reals. Choices at
    the `fixed` addresses are returned unchanged.
    """
    handled = ppl.handle(model, _handler("from_constrained", _fixed_paths(fixed)))
    trace, _ = handled.generate(_no_draw_key(), choices, args)
    _check_complete(model, trace, choices, "to_unconstrained")
    return trace.choices


def to_constrained(model: ppl.GenerativeFunction, args: tuple, unconstrained_choices, fixed=None) -> ppl.Trace:
    """The trace of `model` at `x = t(u)` for real-line values `u` of every latent choice.

    The trace is an ordinary trace of `model` (deterministic sites, observations and the
    score in the constrained space). Choices at the `fixed` addresses are given in
    their own space and used as they are.
    """
    handled = ppl.handle(model, _handler("constrain", _fixed_paths(fixed)))
    trace, _ = handled.generate(_no_draw_key(), unconstrained_choices, args)
    _check_complete(model, trace, unconstrained_choices, "to_constrained")
    return trace.inner


@functools.cache
def _no_draw_key():
    """Every latent choice is given, so nothing is drawn; the key only satisfies the GFI.
    Made at first use, not at import: importing the package must not start JAX's backend
    (the CPU device count can still be set after `import inference`). A concrete key even
    when first asked for inside a trace, so the cached value is never a tracer."""
    with jax.ensure_compile_time_eval():
        return jax.random.key(0)


def _check_complete(model, trace, given, where: str) -> None:
    given = set(ppl.ChoiceMap.of(given).addresses())
    missing = [a for a in trace.choices.addresses() if a not in given]
    if missing:
        raise ppl.ArgumentError(
            f"inference.{where}: no value for the latent choice(s) {', '.join(map(repr, missing))} "
            f"of {model.__name__}; give every latent choice."
        )
