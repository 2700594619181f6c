"""A tiny reference implementation of the modeling language, as an independent oracle.

It answers one question only, the obvious way: the log joint of a complete set of
choices, `assess(model, choices, args) -> (total, per_address, retval)`, where
`per_address` gives each top-level address's log density (a nested call's whole
sub-tree) and the factors. Python loops for `vmap`/`scan`, a Python `if` on a concrete
index for `switch`, numpyro's own `log_prob` with its default validation for every
density. It shares no code with `ppl`, so the core's densities, masks and combinator
sums are checked against it (as pyro tests itself against minipyro).

A model written against this module uses `ref.gen`, `ref.sample`, `ref.factor`,
`ref.reward`, `ref.vmap`, `ref.scan`, `ref.switch` and `ref.mask` with the same
signatures as `ppl`'s.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from numpyro.distributions import Distribution

_stack: list[dict] = []


class _GF:
    def __init__(self, body):
        self.body = body

    def assess(self, choices, args):
        frame = {"choices": choices, "terms": {}}
        _stack.append(frame)
        try:
            retval = self.body(*args)
        finally:
            _stack.pop()
        return sum(frame["terms"].values(), 0.0), frame["terms"], retval


def gen(fn):
    return _GF(fn)


def sample(address, fn, *args, obs=None):
    frame = _stack[-1]
    assert address not in frame["terms"], f"duplicate address {address}"
    if isinstance(fn, Distribution):
        value = obs if obs is not None else frame["choices"][address]
        frame["terms"][address] = float(jnp.sum(fn.log_prob(value)))
        return value
    total, _, retval = fn.assess(frame["choices"][address], args)
    frame["terms"][address] = total
    return retval


def factor(address, log_weight):
    _stack[-1]["terms"][address] = float(jnp.sum(log_weight))


def reward(address, reward_fn, *inputs, beta=1.0):
    r = reward_fn(*inputs)
    _stack[-1]["terms"][address] = float(beta * np.log(np.asarray(r, dtype=np.float64)).sum())
    return r


class _Mask(_GF):
    def __init__(self, inner):
        self.inner = inner

    def assess(self, choices, args):
        total, terms, retval = self.inner.assess(choices, args[1:])
        return (total, terms, retval) if args[0] else (0.0, {}, retval)


def mask(inner):
    return _Mask(inner)


class _Vmap(_GF):
    def __init__(self, inner):
        self.inner = inner

    def assess(self, choices, args):
        n = len(args[0])
        parts = [self.inner.assess(_index(choices, i), tuple(a[i] for a in args)) for i in range(n)]
        return sum(p[0] for p in parts), {}, jnp.stack([p[2] for p in parts])


class _Scan(_GF):
    def __init__(self, kernel):
        self.kernel = kernel

    def assess(self, choices, args):
        carry, xs = args
        total, ys = 0.0, []
        for t in range(len(xs)):
            lp, _, (carry, y) = self.kernel.assess(_index(choices, t), (carry, xs[t]))
            total, ys = total + lp, ys + [y]
        return total, {}, (carry, jnp.stack(ys))


class _Switch(_GF):
    def __init__(self, branches):
        self.branches = branches

    def assess(self, choices, args):
        branch = self.branches[int(args[0])]
        return branch.assess(choices, args[1:])


def vmap(inner):
    return _Vmap(inner)


def scan(kernel):
    return _Scan(kernel)


def switch(*branches):
    return _Switch(branches)


def _index(choices, i):
    """Element i of stacked choices: a plain nested dict."""
    if hasattr(choices, "to_dict"):
        choices = choices.to_dict()
    if isinstance(choices, dict):
        return {k: _index(v, i) for k, v in choices.items()}
    return np.asarray(choices)[i]
