"""`ppl.switch`: choose one of several generative functions by an integer index.

Called with args `(index, *branch_args)`; every branch receives `branch_args` and must
return a value of the same structure, shapes and dtypes. The trace keeps a slot for
every branch so that its shape does not depend on the index: the slots of the branches
not taken hold zeros (placeholders) and count for nothing.

The rule: untaken branches are neither checked nor reported.

- A concrete index (a Python int, or an array that is not a `jax.core.Tracer`) runs
  only the chosen branch, in every method, and `trace.choices` holds only its choices.
  It must lie in `[0, num_branches)`; otherwise the call raises `ppl.ArgumentError`.
- A traced index (under `jit` or `vmap`, or a random choice of a model traced so) runs
  `jax.lax.switch`, which traces every branch. The choices given and the placeholders
  reach the branches as operands, so no branch checks them against its support while
  tracing. `trace.choices` is the union of the branches' addresses (a static shape):
  each address holds the chosen branch's value where it has that address, and a
  placeholder otherwise; an address that several branches use needs the same shape
  and dtype in all of them. An index outside `[0, num_branches)` is clamped to the
  nearest branch, as `jax.lax.switch` clamps it, in every method.

A trace made under `jit` and read outside it holds a concrete index again, so its
choices are the chosen branch's only. Choices given at addresses of branches not taken
are ignored.

`update` that changes the branch drops the old branch and generates the new one: the
weight is the new branch's `generate` weight minus the old score (the new branch's
choices drawn from the prior cancel), and the discard holds every old choice
(`trace.choices`). With a traced index, whether the branch changes is known only when
the code runs, so the discard is always every old choice, a superset of the changed
ones. `regenerate` into another branch draws it from its prior: the weight is the new
branch's evidence minus the old one's (`project(trace, Selection.none())`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._choicemap import ChoiceMap
from ._selection import Selection, select
from ._errors import AddressError, ArgumentError, UnknownAddressError, format_address
from ._gfi import Combinator, GenerativeFunction
from ._trace import Trace

__all__ = ["switch", "SwitchGF"]


def switch(*branches: GenerativeFunction) -> SwitchGF:
    """Choose a branch by index: call with args `(index, *branch_args)`.

    >>> import numpyro.distributions as dist, ppl
    >>> @ppl.gen
    ... def small():
    ...     return ppl.sample("x", dist.Normal(0.0, 1.0))
    >>> @ppl.gen
    ... def large():
    ...     return ppl.sample("x", dist.Normal(0.0, 10.0))
    >>> tr = ppl.switch(small, large).simulate(jax.random.key(0), (1,))
    >>> bool(tr.score == dist.Normal(0.0, 10.0).log_prob(tr["x"]))
    True
    """
    return SwitchGF(*branches)


class SwitchGF(Combinator):
    """One of `branches`, chosen by the first argument."""

    def __init__(self, *branches: GenerativeFunction):
        if not branches:
            raise ArgumentError("ppl.switch needs at least one branch")
        for b in branches:
            if not isinstance(b, GenerativeFunction):
                raise ArgumentError(
                    f"ppl.switch branches must be generative functions, got {type(b).__name__}"
                )
        self.branches = tuple(branches)
        self.__name__ = f"switch({', '.join(b.__name__ for b in branches)})"

    def _parts(self):
        return self.branches

    def _check_arity(self, args, method):
        if not args:
            raise ArgumentError(
                f"{self.__name__}.{method}: a switch is called with args (index, *branch_args)."
            )
        index = jnp.asarray(args[0])
        if not jnp.issubdtype(index.dtype, jnp.integer) or index.shape != ():
            raise ArgumentError(
                f"{self.__name__}.{method}: the index must be an integer scalar, got "
                f"{index.dtype}{list(index.shape)}."
            )
        n = len(self.branches)
        if not isinstance(args[0], jax.core.Tracer) and not 0 <= int(args[0]) < n:
            raise ArgumentError(
                f"{self.__name__}.{method}: index {int(args[0])} is out of range for {n} branches; "
                f"a concrete index must lie in [0, {n})."
            )

    # -- which branch runs ------------------------------------------------------------------
    def _chosen(self, index) -> int | None:
        """The branch a concrete scalar `index` chooses, clamped as `jax.lax.switch` clamps;
        None for a traced index (or a batch of indices)."""
        if isinstance(index, jax.core.Tracer) or jnp.ndim(index) != 0:
            return None
        return min(max(int(index), 0), len(self.branches) - 1)

    def _clamped(self, index):
        return jnp.clip(index, 0, len(self.branches) - 1)

    def _run(self, index, branch, *operands):
        """`branch(i)(*operands)` for the branch `i` that `index` chooses: called directly
        when the index is concrete, through `jax.lax.switch` when it is traced."""
        chosen = self._chosen(index)
        if chosen is not None:
            return branch(chosen)(*operands)
        fns = [branch(i) for i in range(len(self.branches))]
        return jax.lax.switch(self._clamped(index), fns, *operands)

    # -- the slots ----------------------------------------------------------------------------
    def _structs(self, bargs):
        """Each branch's trace structure on `bargs`; their return values must agree."""
        key = jax.random.key(0)
        structs = [jax.eval_shape(b.simulate, key, bargs) for b in self.branches]
        first = _signature(structs[0].retval)
        for b, s in zip(self.branches[1:], structs[1:]):
            if _signature(s.retval) != first:
                raise ArgumentError(
                    f"{self.__name__}: every branch must return a value of the same structure, "
                    f"shapes and dtypes; {self.branches[0].__name__} returns {structs[0].retval} "
                    f"but {b.__name__} returns {s.retval}."
                )
        return structs

    def _slots(self, i, tr, structs):
        return tuple(tr if j == i else _zeros(structs[j]) for j in range(len(self.branches)))

    def _split(self, choices: ChoiceMap, structs, what: str):
        """Per branch, the part of `choices` at that branch's addresses."""
        per_branch = [set(s.choices.addresses()) for s in structs]
        known = set().union(*per_branch)
        for address in choices.addresses():
            if address not in known:
                raise UnknownAddressError(
                    f"{self.__name__}: {what} {format_address(address)} names no random choice "
                    f"of any branch. Their addresses: {sorted(known)}."
                )
        return [choices.filter(select(*a)) if a else ChoiceMap() for a in per_branch]

    # -- the interface ------------------------------------------------------------------------
    def _simulate(self, key, args):
        index, bargs = args[0], args[1:]
        structs = self._structs(bargs)

        def branch(i):
            def run(k):
                tr = self.branches[i].simulate(k, bargs)
                return self._slots(i, tr, structs), tr.retval, tr.score
            return run

        slots, retval, score = self._run(index, branch, key)
        return Trace(self, args, retval, score, slots)

    def _assess(self, choices, args):
        index, bargs = args[0], args[1:]
        structs = self._structs(bargs)
        parts = self._split(choices, structs, "choice")
        if self._chosen(index) is None:  # every branch traces: fill in placeholders
            parts = [_zeros(s.choices).merge(p) for s, p in zip(structs, parts)]

        def branch(i):
            return lambda parts: self.branches[i].assess(parts[i], bargs)

        return self._run(index, branch, parts)

    def _generate(self, key, constraints, args):
        index, bargs = args[0], args[1:]
        structs = self._structs(bargs)
        parts = self._split(constraints, structs, "constraint")

        def branch(i):
            def run(k, parts):
                tr, w = self.branches[i].generate(k, parts[i], bargs)
                return self._slots(i, tr, structs), tr.retval, tr.score, w
            return run

        slots, retval, score, w = self._run(index, branch, key, parts)
        return Trace(self, args, retval, score, slots), w

    def _update(self, key, trace, constraints, args):
        bargs = args[1:]
        structs = self._structs(bargs)
        parts = self._split(constraints, structs, "constraint")
        chosen = self._chosen(args[0])
        if chosen is not None and chosen == self._chosen(trace.args[0]):  # the branch stays
            tr, w, discard = self.branches[chosen].update(key, trace.inner[chosen], parts[chosen], bargs)
            return Trace(self, args, tr.retval, tr.score, self._slots(chosen, tr, structs)), w, discard

        def same(i, k, old, part):
            tr, w, _ = self.branches[i].update(k, old, part, bargs)
            return tr, w

        def moved(i, k, part):  # the old branch leaves; the new one's prior draws cancel
            tr, w = self.branches[i].generate(k, part, bargs)
            return tr, w - trace.score

        new, w = self._move(key, trace, args, structs, parts, same, moved)
        return new, w, trace.choices

    def _regenerate(self, key, trace, selection, args):
        bargs = args[1:]
        none = Selection.none()

        def same(i, k, old, _):
            return self.branches[i]._regenerate(k, old, selection, bargs)

        def moved(i, k, _):  # every choice fresh from the prior: only the evidence weighs
            tr = self.branches[i].simulate(k, bargs)
            return tr, self.branches[i]._project(tr, none) - self._project(trace, none)

        no_constraints = [ChoiceMap()] * len(self.branches)
        return self._move(key, trace, args, self._structs(bargs), no_constraints, same, moved)

    def _move(self, key, trace, args, structs, parts, same, moved):
        """The trace at index `args[0]` from `trace`. Branch `i` runs
        `same(i, k, old_slot, parts[i])` when it is the trace's branch and
        `moved(i, k, parts[i])` when it is not (decided at run time when the old index is
        traced); both give `(branch trace, weight)`."""
        old_index = trace.args[0]
        old_chosen = self._chosen(old_index)

        def branch(i):
            def run(k, slots, parts):
                stay = lambda: same(i, k, slots[i], parts[i])  # noqa: E731
                leave = lambda: moved(i, k, parts[i])  # noqa: E731
                if old_chosen is None:
                    tr, w = jax.lax.cond(self._clamped(old_index) == i, stay, leave)
                else:
                    tr, w = stay() if old_chosen == i else leave()
                return self._slots(i, tr, structs), tr.retval, tr.score, w
            return run

        slots, retval, score, w = self._run(args[0], branch, key, trace.inner, parts)
        return Trace(self, args, retval, score, slots), w

    def _project(self, trace, selection):
        def branch(i):
            return lambda slots: self.branches[i]._project(slots[i], selection)

        return self._run(trace.args[0], branch, trace.inner)

    def _choices(self, trace):
        chosen = self._chosen(trace.args[0])
        if chosen is not None:
            return trace.inner[chosen].choices
        index = self._clamped(jnp.asarray(trace.args[0]))
        per = [t.choices for t in trace.inner]
        merged = {}
        for address in sorted(set().union(*(set(c.addresses()) for c in per))):
            have = [(j, c[address]) for j, c in enumerate(per) if address in c]
            value = have[0][1]
            for j, other in have[1:]:
                if jnp.shape(other) != jnp.shape(value) or jnp.result_type(other) != jnp.result_type(value):
                    raise AddressError(
                        f"{self.__name__}: branches use address {format_address(address)} with "
                        "different shapes or dtypes; give them different addresses."
                    )
                pick = jnp.reshape(index == j, index.shape + (1,) * (jnp.ndim(value) - index.ndim))
                value = jnp.where(pick, other, value)
            merged[address] = value
        return ChoiceMap(merged)


def _zeros(struct):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), struct)


def _signature(tree):
    """Tree structure, shapes and dtypes: what `jax.lax.switch` needs branches to share."""
    return jax.tree.structure(tree), [(s.shape, s.dtype) for s in jax.tree.leaves(tree)]
