"""Running a per-particle function over a batch of keys without broadcasting shared leaves.

`jax.vmap` with `out_axes=0` broadcasts every output, so a batch of 100,000 traces of a
regression model would hold 100,000 copies of the observed data and of the arguments.
An output that does not depend on the particle's index is the same for every particle;
`vmap_particles` keeps it unbatched (`out_axes=None`). Dependence is read off the jaxpr
by a forward pass, conservatively (an equation with any key-dependent input makes all
its outputs key-dependent), and the same jaxpr is then batched, so the model is traced
once.
"""

from __future__ import annotations

import jax
from jax.extend.core import Literal, jaxpr_as_fun

__all__ = ["vmap_particles"]


def vmap_particles(fn, indices):
    """`jax.vmap(fn)(indices)`, with outputs that do not depend on the index left unbatched.

    `fn(i)` runs particle `i` and closes over everything else it needs (the batch's key,
    the data). Returns `(outputs, is_batched)`: `outputs` has `fn`'s pytree structure,
    with leading axis `len(indices)` on the leaves whose flag in the flat tuple
    `is_batched` is True, and no batch axis elsewhere.
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(indices[0])
    treedef = jax.tree.structure(out_shape)
    jaxpr = closed.jaxpr
    depends = set(jaxpr.invars)  # the index is fn's only input
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, Literal) and v in depends for v in eqn.invars):
            depends.update(eqn.outvars)
    is_batched = tuple(not isinstance(v, Literal) and v in depends for v in jaxpr.outvars)
    out_axes = [0 if b else None for b in is_batched]
    leaves = jax.vmap(jaxpr_as_fun(closed), out_axes=out_axes)(indices)
    return jax.tree.unflatten(treedef, leaves), is_batched
