"""Batches (particles, chains) whose members share leaves: kept once, not once per member.

`jax.vmap` with `out_axes=0` broadcasts every output, so a batch of 1,000 traces of a
regression model would hold 1,000 copies of the design matrix, and every vmapped
gradient would read its own copy. Two tools avoid that, both by reading the jaxpr:

- `vmap_shared(fn, *batched)`: outputs that depend on no batched input are returned
  unbatched (one copy), with a flag per flat output leaf.
- `vmap_states(fn, batched, shared)`, `StateLayout` and `StepProgram`: for loop-carried
  states (MCMC chains, SMC particles under rejuvenation). The leaves of a member's state
  that are the shared inputs passed through unchanged (the model's arguments and observed
  values inside each trace) are dropped from the batch; `StateLayout.join` puts the one
  shared copy back in before a kernel step and `StateLayout.split` drops it again after.
  Leaves that are the same for every member and stay so under the step (an iteration
  counter: read off the step's jaxpr) are carried once, unbatched, so that a `lax.cond`
  on them (warmup or not, end of an adaptation window) stays a branch under `jax.vmap`
  instead of becoming a `select` that runs both sides for every member.
"""

from __future__ import annotations

import jax
from jax.extend.core import Literal, jaxpr_as_fun

__all__ = ["vmap_shared", "vmap_states", "StateLayout", "StatesProgram", "StepProgram"]


def _dependents(jaxpr, sources) -> set:
    """The variables of `jaxpr` that depend on any of `sources`, by a forward pass.

    At least as conservative as `jax.vmap`'s batching, so that a variable found
    independent is one vmap leaves unbatched: an equation with a dependent input makes
    all its outputs dependent, except the control flow, followed inside as vmap does.
    A `cond` on an independent index makes an output dependent only if a branch does
    (numpyro's end-of-window step-size search stays a branch instead of a `select` run
    at every warmup step); a `while`/`scan` carry becomes dependent by a fixed point over
    the body (any dependent `while` predicate makes every carry dependent); a nested
    `jit` is followed through its jaxpr.
    """
    depends = set(sources)
    for eqn in jaxpr.eqns:
        inputs = [_depends(v, depends) for v in eqn.invars]
        if not any(inputs):
            continue
        outputs = _equation_dependence(eqn, inputs)
        depends.update(v for v, d in zip(eqn.outvars, outputs) if d)
    return depends


def _flags(closed, inputs) -> list:
    """Which outputs of the closed jaxpr `closed` depend on its inputs flagged in `inputs`."""
    jaxpr = closed.jaxpr
    depends = _dependents(jaxpr, [v for v, d in zip(jaxpr.invars, inputs) if d])
    return [_depends(v, depends) for v in jaxpr.outvars]


def _equation_dependence(eqn, inputs: list) -> list:
    name, params, n = eqn.primitive.name, eqn.params, len(eqn.outvars)
    if name == "cond":
        if inputs[0]:  # a dependent index: vmap turns the cond into a select
            return [True] * n
        per_branch = [_flags(branch, inputs[1:]) for branch in params["branches"]]
        return [any(flags) for flags in zip(*per_branch)]
    if name == "while":
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        cond_consts, body_consts = inputs[:nc], inputs[nc:nc + nb]

        def while_body(carry):
            if _flags(params["cond_jaxpr"], cond_consts + carry)[0]:  # a per-member predicate
                return [True] * len(carry), []
            return _flags(params["body_jaxpr"], body_consts + carry), []

        carry, _ = _loop_fixed_point(inputs[nc + nb:], while_body)
        return carry
    if name == "scan":
        nc, nk = params["num_consts"], params["num_carry"]
        consts, xs = inputs[:nc], inputs[nc + nk:]

        def scan_body(carry):
            out = _flags(params["jaxpr"], consts + carry + xs)
            return out[:nk], out[nk:]

        carry, ys = _loop_fixed_point(inputs[nc:nc + nk], scan_body)
        return carry + ys
    if name in ("jit", "pjit"):
        return _flags(params["jaxpr"], inputs)
    return [True] * n


def _loop_fixed_point(carry: list, body) -> tuple:
    """A loop's carry flags, grown until `body(carry) -> (carry_out, ys)` adds none:
    `(carry, ys)` at the fixed point."""
    while True:
        carry_out, ys = body(carry)
        new = [c or b for c, b in zip(carry, carry_out)]
        if new == carry:
            return carry, ys
        carry = new


def _depends(v, depends: set) -> bool:
    return not isinstance(v, Literal) and v in depends


def vmap_shared(fn, *batched):
    """`jax.vmap(fn)(*batched)`, with the outputs that depend on no batched input left
    unbatched.

    Every argument is batched along axis 0. Returns `(outputs, is_batched)`: `outputs` has
    `fn`'s pytree structure, with the leading batch axis on the leaves whose flag in the
    flat tuple `is_batched` is True and no batch axis elsewhere. Dependence is read off
    the jaxpr by a forward pass; the same jaxpr is then batched, so `fn` is traced once.
    """
    first = jax.tree.map(lambda leaf: leaf[0], batched)
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*first)
    depends = _dependents(closed.jaxpr, closed.jaxpr.invars)
    is_batched = tuple(_depends(v, depends) for v in closed.jaxpr.outvars)
    out_axes = [0 if b else None for b in is_batched]
    leaves = jax.vmap(jaxpr_as_fun(closed), out_axes=out_axes)(*jax.tree.leaves(batched))
    return jax.tree.unflatten(jax.tree.structure(out_shape), leaves), is_batched


class StateLayout:
    """Where each flat leaf of a member's state lives in a batch.

    `sources[i]` is the index in `jax.tree.leaves(shared)` of the shared input that leaf
    `i` is (the model's arguments, the observations), or None for the member's own
    leaves. A batch is held as `own`, the list of the own leaves in order: with a leading
    batch axis, except those flagged in `uniform` (one per own leaf), which are the same
    for every member and held once. Static and hashable: a `jax.jit` static argument.
    """

    __slots__ = ("treedef", "sources", "uniform")

    def __init__(self, treedef, sources: tuple, uniform: tuple):
        self.treedef = treedef
        self.sources = tuple(sources)
        self.uniform = tuple(uniform)

    def _key(self):
        return (self.treedef, self.sources, self.uniform)

    def __eq__(self, other):
        return isinstance(other, StateLayout) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def split(self, state) -> list:
        """The own leaves of `state` (one member's, or a batch's): the shared ones dropped."""
        leaves = jax.tree.leaves(state)
        return [leaf for leaf, source in zip(leaves, self.sources) if source is None]

    def join(self, own, shared, broadcast=None):
        """The state from its own leaves and the shared inputs. For a batch, the shared
        and uniform leaves stay unbatched unless `broadcast(leaf)` is given (e.g. a
        zero-copy `np.broadcast_to` view, to index or inspect the batch on the host)."""
        shared_leaves = jax.tree.leaves(shared)
        own = iter(zip(own, self.uniform))
        leaves = []
        for source in self.sources:
            if source is None:
                leaf, uniform = next(own)
                leaves.append(broadcast(leaf) if uniform and broadcast is not None else leaf)
            else:
                leaf = shared_leaves[source]
                leaves.append(leaf if broadcast is None else broadcast(leaf))
        return jax.tree.unflatten(self.treedef, leaves)

    def take(self, own, indices) -> list:
        """The members at `indices` (resampling: a gather along the batch axis)."""
        return [leaf if uniform else leaf[indices] for leaf, uniform in zip(own, self.uniform)]


class StatesProgram:
    """A member's state-building function `fn(batched, shared)`, traced once.

    `program(batched, shared)` is the batch's own leaves (every argument in `batched`
    has a leading batch axis), `program.layout` their `StateLayout`: a result leaf that
    is a leaf of `shared` passed through unchanged (the output variable of the jaxpr is
    the input variable) is shared; one that depends on no batched input is uniform.
    Only what is never moved may be in `shared` (the model's arguments, the
    observations): a chain's starting values belong in `batched`. Hashable by identity,
    so a cached program is a `jax.jit` static argument.
    """

    __slots__ = ("layout", "_closed", "_num_batched")

    def __init__(self, fn, batched_example, shared):
        flat_shared, shared_def = jax.tree.flatten(shared)
        self._num_batched = len(jax.tree.leaves(batched_example))

        def flat_fn(b, s):
            return fn(b, jax.tree.unflatten(shared_def, s))

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(batched_example, flat_shared)
        invars, outvars = closed.jaxpr.invars, closed.jaxpr.outvars
        shared_vars = {v: i for i, v in enumerate(invars[self._num_batched:])}
        sources = tuple(None if isinstance(v, Literal) else shared_vars.get(v) for v in outvars)
        depends = _dependents(closed.jaxpr, invars[: self._num_batched])
        uniform = tuple(not _depends(v, depends) for v, source in zip(outvars, sources) if source is None)
        self._closed = closed
        self.layout = StateLayout(jax.tree.structure(out_shape), sources, uniform)

    def own_shapes(self, n: int) -> list:
        """The `jax.ShapeDtypeStruct`s of `program(batched, shared)` for a batch of n,
        read off the trace (no new trace, unlike `jax.eval_shape`)."""
        own = [aval for aval, source in zip(self._closed.out_avals, self.layout.sources) if source is None]
        return [jax.ShapeDtypeStruct(a.shape if u else (n,) + a.shape, a.dtype, weak_type=a.weak_type)
                for a, u in zip(own, self.layout.uniform)]

    def __call__(self, batched, shared) -> list:
        flat_shared = jax.tree.leaves(shared)
        in_axes = [0] * self._num_batched + [None] * len(flat_shared)
        own_axes = iter(None if u else 0 for u in self.layout.uniform)
        out_axes = [next(own_axes) if source is None else None for source in self.layout.sources]
        leaves = jax.vmap(jaxpr_as_fun(self._closed), in_axes=in_axes, out_axes=out_axes)(
            *jax.tree.leaves(batched), *flat_shared)
        return self.layout.split(jax.tree.unflatten(self.layout.treedef, leaves))


class StepProgram:
    """`step(key, state) -> (state, out)` over a batch held as `StateLayout` leaves
    (arrays, or their shapes as `jax.ShapeDtypeStruct`s), traced once: `program(keys, own, shared) -> (own, out)`, `keys` and the batched own
    leaves with a leading batch axis, `out` batched.

    Each member's state is joined with the one copy of `shared`, stepped, and split
    again: a step must leave the shared leaves unchanged (a kernel never changes the
    model's arguments or observed values). A uniform leaf of `layout` stays uniform only
    if the step's result there depends on no batched input (read off the jaxpr, to a
    fixed point); `program.layout` is the layout that holds, and `program.adopt(own, n)`
    broadcasts the leaves that stopped being uniform. Hashable by identity.
    """

    __slots__ = ("layout", "_closed", "_out_def", "_num_own", "_was_uniform")

    def __init__(self, step, layout: StateLayout, key_example, own, shared):
        flat_shared, shared_def = jax.tree.flatten(shared)
        member = [leaf if u else _member(leaf) for leaf, u in zip(own, layout.uniform)]
        out_def = []

        def flat_step(key, own_leaves, shared_leaves):
            state, out = step(key, layout.join(own_leaves, jax.tree.unflatten(shared_def, shared_leaves)))
            out_leaves, treedef = jax.tree.flatten(out)
            out_def[:] = [treedef]
            return layout.split(state), out_leaves

        closed = jax.make_jaxpr(flat_step)(key_example, member, flat_shared)
        n = len(own)
        key_var, own_vars = closed.jaxpr.invars[0], closed.jaxpr.invars[1:1 + n]
        uniform = list(layout.uniform)
        while True:  # demote the uniform leaves the step makes depend on a batched input
            depends = _dependents(closed.jaxpr, [key_var] + [v for v, u in zip(own_vars, uniform) if not u])
            new = [u and not _depends(v, depends) for u, v in zip(uniform, closed.jaxpr.outvars[:n])]
            if new == uniform:
                break
            uniform = new
        self._closed, self._out_def, self._num_own = closed, out_def[0], n
        self._was_uniform = layout.uniform
        self.layout = StateLayout(layout.treedef, layout.sources, tuple(uniform))

    def adopt(self, own, n: int) -> list:
        """`own` as held under the input layout, re-held under `self.layout` (a batch of n);
        `own` may be arrays or their shapes (`jax.ShapeDtypeStruct`)."""
        return [_broadcast(leaf, n) if was and not now else leaf
                for leaf, was, now in zip(own, self._was_uniform, self.layout.uniform)]

    def __call__(self, keys, own, shared):
        flat_shared = jax.tree.leaves(shared)
        own_axes = [None if u else 0 for u in self.layout.uniform]
        num_out = len(self._closed.jaxpr.outvars) - self._num_own
        if jax.numpy.shape(keys)[0] == 1:
            # One member (one chain per device): stepped as is, not vmapped, so that a
            # lax.cond on its values stays a branch; under vmap it becomes a select that
            # runs both sides (NUTS tree building).
            member = [o if a is None else o[0] for o, a in zip(own, own_axes)]
            leaves = jaxpr_as_fun(self._closed)(keys[0], *member, *flat_shared)
            leaves = [x if a is None else x[None] for x, a in zip(leaves, own_axes + [0] * num_out)]
        else:
            leaves = jax.vmap(jaxpr_as_fun(self._closed), in_axes=[0] + own_axes + [None] * len(flat_shared),
                              out_axes=own_axes + [0] * num_out)(keys, *own, *flat_shared)
        return leaves[: self._num_own], jax.tree.unflatten(self._out_def, leaves[self._num_own:])


def _member(leaf):
    """One member of a batched leaf (an array or a `jax.ShapeDtypeStruct`)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[0]


def _broadcast(leaf, n: int):
    """A leaf held once, as a batch of n (an array or a `jax.ShapeDtypeStruct`)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((n,) + leaf.shape, leaf.dtype)
    return jax.numpy.broadcast_to(leaf, (n,) + jax.numpy.shape(leaf))


def vmap_states(fn, batched, shared):
    """`jax.vmap(fn, in_axes=(0, None))(batched, shared)` for a function that builds a
    member's state, returning `(layout, own)`: the shared leaves left out, the uniform
    ones unbatched (see `StatesProgram`). `layout.join(own, shared)` is the batch of
    states; `StepProgram(step, layout, key, own, shared)` steps it.
    """
    program = StatesProgram(fn, jax.tree.map(lambda leaf: leaf[0], batched), shared)
    return program.layout, program(batched, shared)
