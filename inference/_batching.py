"""Which outputs of a per-particle function actually vary from particle to particle.

`jax.vmap` with `out_axes=0` broadcasts every output, so a batch of 100,000 traces of a
regression model would hold 100,000 copies of the observed data and of the arguments.
An output that does not depend on the particle's key is the same for every particle;
keeping it unbatched (`out_axes=None`) saves that memory traffic. Dependence is read
off the jaxpr by a forward pass, conservatively: an equation with any key-dependent
input makes all its outputs key-dependent.
"""

from __future__ import annotations

import jax
from jax.extend.core import Literal

__all__ = ["key_dependent_outputs"]


def key_dependent_outputs(fn, key):
    """`fn(key)`'s output pytree with True where a leaf depends on `key`.

    Everything else `fn` needs is closed over, so it stays as concrete (or as outer
    tracers) as the caller has it.

    Falls back to all-True (plain vmap behaviour) if the jaxpr cannot be analysed.
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(key)
    treedef = jax.tree.structure(out_shape)
    try:
        jaxpr = closed.jaxpr
        depends = set(jaxpr.invars[: len(jax.tree.leaves(key))])
        for eqn in jaxpr.eqns:
            if any(not isinstance(v, Literal) and v in depends for v in eqn.invars):
                depends.update(eqn.outvars)
        flags = [not isinstance(v, Literal) and v in depends for v in jaxpr.outvars]
    except Exception:  # noqa: BLE001 - an unexpected jaxpr form only costs memory
        flags = [True] * treedef.num_leaves
    return jax.tree.unflatten(treedef, flags)
