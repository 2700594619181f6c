"""`ppl.vmap`: a generative function repeated over a batch axis of its arguments.

The trace holds the kernel's traces stacked along the mapped axis (axis 0); so do its
choices: `trace["points", "y"].shape == (n,)`. Each element draws from its own key
(`split(key, n)`; under a particle key the split is shared by the batch of particles),
and the score is the sum of the element scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _keys
from ._choicemap import ChoiceMap, check_leading_axis
from ._errors import ArgumentError
from ._gfi import GenerativeFunction
from ._stacked import StackedGF
from ._trace import Trace

__all__ = ["vmap", "VmapGF"]


def _freeze(x):
    if isinstance(x, list):
        return tuple(_freeze(v) for v in x)
    if isinstance(x, tuple):
        return tuple(_freeze(v) for v in x)
    return x


class VmapGF(StackedGF):
    """`gen_fn` mapped over axis `in_axes` of its args (as `jax.vmap`'s `in_axes`)."""

    def __init__(self, gen_fn: GenerativeFunction, in_axes=0):
        if not isinstance(gen_fn, GenerativeFunction):
            raise ArgumentError(f"ppl.vmap expects a generative function, got {type(gen_fn).__name__}")
        self.gen_fn = gen_fn
        self.element = gen_fn
        self.in_axes = _freeze(in_axes)
        self.__name__ = f"vmap({gen_fn.__name__})"

    def _parts(self):
        return (self.gen_fn, self.in_axes)

    def _axes(self, args: tuple) -> tuple:
        if not isinstance(self.in_axes, tuple):
            return (self.in_axes,) * len(args)
        if len(self.in_axes) != len(args):
            raise ArgumentError(
                f"{self.__name__}: in_axes={self.in_axes} has {len(self.in_axes)} entries but "
                f"{len(args)} argument(s) were given; give one axis (or None) per argument."
            )
        return self.in_axes

    def _size(self, args: tuple) -> int:
        sizes = set()
        is_none = lambda x: x is None  # noqa: E731 - None is an axis here, not an empty subtree
        for arg, axis in zip(args, self._axes(args)):
            # An axis may be a prefix of its argument's tree, as in jax.vmap.
            axes = jax.tree.leaves(jax.tree.broadcast(axis, arg, is_leaf=is_none), is_leaf=is_none)
            for leaf, ax in zip(jax.tree.leaves(arg), axes):
                if ax is not None:
                    sizes.add(jnp.shape(leaf)[ax])
        if not sizes:
            raise ArgumentError(
                f"{self.__name__}: no argument is mapped (in_axes={self.in_axes}), so the batch "
                "size is unknown. Map at least one argument, e.g. in_axes=(0,)."
            )
        if len(sizes) > 1:
            raise ArgumentError(f"{self.__name__}: mapped arguments have different sizes {sorted(sizes)}.")
        return sizes.pop()

    def _check_arity(self, args, method):
        self._axes(args)

    def _check_stacked(self, choices: ChoiceMap, size: int, what: str) -> None:
        check_leading_axis(choices, size, owner=self.__name__, what=what, axis="mapped axis")

    def _wrap(self, args, tr):
        # The stacked kernel trace keeps the combinator's args as given: an argument
        # mapped with in_axes None (a slope shared by every point) is stored once, not
        # broadcast to every element.
        return Trace(self, args, tr.retval, jnp.sum(tr.score), self._stack(args, tr))

    def _map_elements(self, fn, trace, *operands, in_axes=()):
        """`jax.vmap` of `fn(element_trace, *operands)` over the stacked kernel trace."""
        stacked = trace.inner
        parts = (stacked.retval, stacked.score, stacked.inner)

        def one(p, a, *ops):
            return fn(self._element(a, *p), *ops)

        return jax.vmap(one, in_axes=(0, self._axes(trace.args)) + tuple(in_axes))(parts, trace.args, *operands)

    def _simulate(self, key, args):
        keys, key_axes = _keys.split(key, self._size(args))
        tr = jax.vmap(self.gen_fn.simulate, in_axes=(key_axes, self._axes(args)))(keys, args)
        return self._wrap(args, tr)

    def _assess(self, choices, args):
        self._check_stacked(choices, self._size(args), "choice")
        lp, retval = jax.vmap(self.gen_fn.assess, in_axes=(0, self._axes(args)))(choices, args)
        return jnp.sum(lp), retval

    def _generate(self, key, constraints, args):
        n = self._size(args)
        self._check_stacked(constraints, n, "constraint")
        keys, key_axes = _keys.split(key, n)
        tr, w = jax.vmap(self.gen_fn.generate, in_axes=(key_axes, 0, self._axes(args)))(keys, constraints, args)
        return self._wrap(args, tr), jnp.sum(w)

    def _update(self, key, trace, constraints, args):
        n = self._size(args)
        self._check_stacked(constraints, n, "constraint")
        keys, key_axes = _keys.split(key, n)
        update = lambda old, k, c, a: self.gen_fn.update(k, old, c, a)  # noqa: E731
        tr, w, discard = self._map_elements(
            update, trace, keys, constraints, args, in_axes=(key_axes, 0, self._axes(args))
        )
        return self._wrap(args, tr), jnp.sum(w), discard

    def _regenerate(self, key, trace, selection, args):
        keys, key_axes = _keys.split(key, self._size(args))
        step = lambda old, k, a: self.gen_fn._regenerate(k, old, selection, a)  # noqa: E731
        tr, w = self._map_elements(step, trace, keys, args, in_axes=(key_axes, self._axes(args)))
        return self._wrap(args, tr), jnp.sum(w)

    def _project(self, trace, selection):
        return jnp.sum(self._map_elements(lambda t: self.gen_fn._project(t, selection), trace))



def vmap(gen_fn: GenerativeFunction, in_axes=0) -> VmapGF:
    """Batched repetition of `gen_fn`: called with args whose `in_axes` are mapped.

    >>> import numpyro.distributions as dist, ppl
    >>> @ppl.gen
    ... def point(x):
    ...     return ppl.sample("y", dist.Normal(x, 1.0))
    >>> tr = ppl.vmap(point, in_axes=(0,)).simulate(jax.random.key(0), (jnp.arange(3.0),))
    >>> tr["y"].shape
    (3,)
    """
    return VmapGF(gen_fn, in_axes)
