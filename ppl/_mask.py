"""`ppl.mask`: switch a generative function's contribution on or off with a traced flag.

Called with args `(is_active, *args)`. The wrapped function always runs (shapes stay
static), but when `is_active` is False its choices are placeholders: they add nothing
to the score, to `assess`, or to any weight. This is how a finished particle (an LLM
solution that emitted its final answer) stops contributing while its batch goes on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._selection import Selection
from ._errors import ArgumentError
from ._gfi import Combinator, GenerativeFunction
from ._trace import Trace

__all__ = ["mask", "MaskGF"]


def _where(flag, a, b):
    return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


class MaskGF(Combinator):
    """`gen_fn` whose density and weights count only while the flag is on."""

    def __init__(self, gen_fn: GenerativeFunction):
        if not isinstance(gen_fn, GenerativeFunction):
            raise ArgumentError(f"ppl.mask expects a generative function, got {type(gen_fn).__name__}")
        self.gen_fn = gen_fn
        self.__name__ = f"mask({gen_fn.__name__})"

    def _parts(self):
        return (self.gen_fn,)

    def _check_arity(self, args, method):
        if not args:
            raise ArgumentError(f"{self.__name__}.{method}: a mask is called with args (is_active, *args).")
        flag = jnp.asarray(args[0])
        if flag.shape != () or not (flag.dtype == jnp.bool_ or jnp.issubdtype(flag.dtype, jnp.integer)):
            raise ArgumentError(
                f"{self.__name__}.{method}: is_active must be a boolean scalar, got {flag.dtype}{list(flag.shape)}."
            )
        self.gen_fn._check_arity(tuple(args[1:]), method)

    @staticmethod
    def _flag(args):
        return jnp.asarray(args[0], dtype=bool)

    def _wrap(self, args, tr):
        return Trace(self, args, tr.retval, jnp.where(self._flag(args), tr.score, 0.0), tr)

    def _simulate(self, key, args):
        return self._wrap(args, self.gen_fn.simulate(key, args[1:]))

    def _assess(self, choices, args):
        # lax.cond, not jnp.where: a masked-off body must add zero value and zero
        # gradient, and the gradient of where(False, f(x), 0) is NaN wherever f' is
        # infinite (jnp.sqrt at 0). Under vmap with a batched flag cond becomes a
        # select, and that caveat returns (documented in `mask`).
        def on():
            return self.gen_fn.assess(choices, args[1:])

        def off():  # the density is dropped, so no cotangent reaches the body
            lp, retval = on()
            return jnp.zeros_like(lp), retval

        flag = args[0]
        if isinstance(flag, (bool, int)):
            return on() if flag else off()
        return jax.lax.cond(self._flag(args), on, off)

    def _generate(self, key, constraints, args):
        tr, w = self.gen_fn.generate(key, constraints, args[1:])
        return self._wrap(args, tr), jnp.where(self._flag(args), w, 0.0)

    def _update(self, key, trace, constraints, args):
        was, now = self._flag(trace.args), self._flag(args)
        moved, w_moved, discard = self.gen_fn.update(key, trace.inner, constraints, args[1:])
        # Switched on: the old placeholders were never choices, so start afresh.
        fresh, w_fresh = self.gen_fn.generate(key, constraints, args[1:])
        switched_on = now & ~was
        tr = _where(switched_on, fresh, moved)
        w = jnp.where(was & now, w_moved, jnp.where(switched_on, w_fresh, jnp.where(was, -trace.score, 0.0)))
        return self._wrap(args, tr), w, discard

    def _regenerate(self, key, trace, selection, args):
        was, now = self._flag(trace.args), self._flag(args)
        moved, w_moved = self.gen_fn._regenerate(key, trace.inner, selection, args[1:])
        fresh = self.gen_fn.simulate(key, args[1:])
        switched_on = now & ~was
        tr = _where(switched_on, fresh, moved)
        none = Selection.none()
        w = jnp.where(
            was & now,
            w_moved,
            jnp.where(
                switched_on,
                self.gen_fn._project(fresh, none),
                jnp.where(was, -self.gen_fn._project(trace.inner, none), 0.0),
            ),
        )
        return self._wrap(args, tr), w

    def _project(self, trace, selection):
        return jnp.where(self._flag(trace.args), self.gen_fn._project(trace.inner, selection), 0.0)

    def _choices(self, trace):
        return trace.inner.choices

    def _lookup(self, trace, path):
        return self.gen_fn._lookup(trace.inner, path)

    def _site_scores(self, trace, path):
        flag = self._flag(trace.args)
        for address, score in self.gen_fn._site_scores(trace.inner, path):
            yield address, jnp.where(flag, score, 0.0)


def mask(gen_fn: GenerativeFunction) -> MaskGF:
    """`gen_fn` gated by a boolean first argument: call with args `(is_active, *args)`.

    While `is_active` is False the function still runs (its trace keeps a static
    shape) but adds nothing to the score, to `assess` or to any weight, and `assess`
    passes no gradient into its body. One caveat: under `jax.vmap` with a batched
    flag, JAX evaluates both sides, and the gradient of a masked-off density that is
    singular at its placeholder values (jnp.sqrt at 0) can be NaN.

    >>> import numpyro.distributions as dist, ppl
    >>> @ppl.gen
    ... def step():
    ...     return ppl.sample("x", dist.Normal(0.0, 1.0))
    >>> float(ppl.mask(step).simulate(jax.random.key(0), (False,)).score)
    0.0
    """
    return MaskGF(gen_fn)
