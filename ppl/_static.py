"""Splitting a pytree into traced array leaves and static Python leaves for `jax.jit`.

Model arguments mix data (arrays, floats) with structure (an int that sets a shape, a
string, a flag, the activation function of a neural network). Under `jit` the structure
must stay a Python value, or `dist.Normal(...).expand((n,))` sees a tracer. The rule,
as equinox's `is_array` filter: arrays (JAX, NumPy, NumPy scalars) and Python floats and
complex numbers are data and traced; every other leaf (int, bool, str, None, a function,
any other object) is static: part of the structure, hashable, a new value recompiles.

This is how a model's parameters travel: as arguments. A VAE decoder or a language
model is an equinox module (a pytree of weight arrays plus static callables) passed in
`args`, so `jax.jit`, `jax.grad` (or `eqx.filter_grad`) and `lax.scan` see its weights
as data and its functions as structure.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["Static", "partition", "combine", "is_data"]

_DATA_TYPES = (jax.Array, np.ndarray, np.generic, float, complex)


def is_data(leaf) -> bool:
    """True for a leaf that is traced data (an array or a float), False for structure."""
    return isinstance(leaf, _DATA_TYPES) and not isinstance(leaf, bool)


class Static(NamedTuple):
    """Hashable description of the static part: the tree structure and static leaves."""

    treedef: Any
    static_leaves: tuple  # (position, value) pairs


def partition(tree) -> tuple[list, Static]:
    """`tree` -> (traced leaves, static part); `combine` inverts it."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: x is None)
    dynamic, static = [], []
    for i, leaf in enumerate(leaves):
        if is_data(leaf):
            dynamic.append(leaf)
        else:
            static.append((i, leaf))
    return dynamic, Static(treedef, tuple(static))


def combine(dynamic: list, static: Static):
    fixed = dict(static.static_leaves)
    it = iter(dynamic)
    leaves = [fixed[i] if i in fixed else next(it) for i in range(static.treedef.num_leaves)]
    return jax.tree.unflatten(static.treedef, leaves)
