"""Splitting a pytree into traced array leaves and static Python leaves for `jax.jit`.

Model arguments mix data (arrays, floats) with structure (an int that sets a shape, a
string, a flag). Under `jit` the structure must stay a Python value, or
`dist.Normal(...).expand((n,))` sees a tracer. Leaves of type int, bool, str and None
are static (a new value recompiles); everything else is traced.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

__all__ = ["Static", "partition", "combine"]

_STATIC_TYPES = (bool, int, str, type(None))


class Static(NamedTuple):
    """Hashable description of the static part: the tree structure and static leaves."""

    treedef: Any
    static_leaves: tuple  # (position, value) pairs


def partition(tree) -> tuple[list, Static]:
    """`tree` -> (traced leaves, static part); `combine` inverts it."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: x is None)
    dynamic, static = [], []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, _STATIC_TYPES):
            static.append((i, leaf))
        else:
            dynamic.append(leaf)
    return dynamic, Static(treedef, tuple(static))


def combine(dynamic: list, static: Static):
    fixed = dict(static.static_leaves)
    it = iter(dynamic)
    leaves = [fixed[i] if i in fixed else next(it) for i in range(static.treedef.num_leaves)]
    return jax.tree.unflatten(static.treedef, leaves)
