"""What the combinators that stack their element traces (`vmap`, `scan`) share.

Their trace's `inner` is the element function's trace with every leaf stacked along the
mapped (or time) axis, so choices, named values and per-site scores are read from it
directly; only the per-site scores need the stacked axis summed.
"""

from __future__ import annotations

import jax.numpy as jnp

from ._gfi import GenerativeFunction

__all__ = ["StackedGF"]


class StackedGF(GenerativeFunction):
    """Base of combinators whose trace stacks the traces of `self.element`."""

    element: GenerativeFunction

    def _choices(self, trace):
        return trace.inner.choices

    def _lookup(self, trace, path):
        return self.element._lookup(trace.inner, path)

    def _site_scores(self, trace, path):
        for address, score in self.element._site_scores(trace.inner, path):
            yield address, jnp.sum(score, axis=-1)
