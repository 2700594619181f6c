"""What the combinators that stack their element traces (`vmap`, `scan`) share.

Their trace's `inner` is the element function's trace with every leaf stacked along the
mapped (or time) axis, so choices, named values and per-site scores are read from it
directly; only the per-site scores need the stacked axis summed.
"""

from __future__ import annotations

import jax.numpy as jnp

from ._gfi import Combinator, GenerativeFunction
from ._trace import Trace

__all__ = ["StackedGF"]


class StackedGF(Combinator):
    """Base of combinators whose trace stacks the traces of `self.element`."""

    element: GenerativeFunction

    def _stack(self, args, elements: Trace) -> Trace:
        """The element traces as the combinator's trace stores them, with `args` (for vmap
        the combinator's own, a shared argument stored once). Where the element's score is
        the sum of its records' (a DSL function), the records already hold it, and a
        per-element score array (a second `[N, n]` array under N particles) is not kept."""
        score = None if self.element._score_derivable else elements.score
        return Trace(elements.gen_fn, args, elements.retval, score, elements.inner)

    def _element(self, args, retval, score, inner) -> Trace:
        """One element's trace from its stored parts (inside a vmap or scan over them)."""
        if score is None:
            score = self.element._score_from_inner(inner)
        return Trace(self.element, args, retval, score, inner)

    def _choices(self, trace):
        return trace.inner.choices

    def _lookup(self, trace, path):
        return self.element._lookup(trace.inner, path)

    def _site_scores(self, trace, path):
        for address, score in self.element._site_scores(trace.inner, path):
            yield address, jnp.sum(score, axis=-1)
