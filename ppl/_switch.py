"""`ppl.switch`: choose one of several generative functions by a traced index.

Called with args `(index, *branch_args)`; every branch receives `branch_args`. Only
the chosen branch runs (`jax.lax.switch`), but the trace keeps a slot for every
branch so that its shape is static; unused slots hold zeros and count for nothing.
Branches must return values of the same structure. `trace.choices` merges the
branches: an address used by several branches holds the chosen branch's value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._choicemap import ChoiceMap
from ._selection import Selection, select
from ._errors import AddressError, ArgumentError, UnknownAddressError, format_address
from ._gfi import GenerativeFunction
from ._trace import Trace

__all__ = ["switch", "SwitchGF"]


def _zeros(struct):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), struct)


class SwitchGF(GenerativeFunction):
    """One of `branches`, chosen by the first argument."""

    def __init__(self, *branches: GenerativeFunction):
        if not branches:
            raise ArgumentError("ppl.switch needs at least one branch")
        for b in branches:
            if not isinstance(b, GenerativeFunction):
                raise ArgumentError(f"ppl.switch branches must be generative functions, got {type(b).__name__}")
        self.branches = tuple(branches)
        self.__name__ = f"switch({', '.join(b.__name__ for b in branches)})"

    def __eq__(self, other):
        return type(other) is SwitchGF and other.branches == self.branches

    def __hash__(self):
        return hash((SwitchGF, self.branches))

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

    def _structs(self, bargs):
        key = jax.random.key(0)
        return [jax.eval_shape(b.simulate, key, bargs) for b in self.branches]

    def _addresses(self, structs):
        return [set(s.choices.addresses()) for s in structs]

    def _split(self, choices: ChoiceMap, structs, what: str):
        """Per branch, the part of `choices` at that branch's addresses."""
        per_branch = self._addresses(structs)
        known = set().union(*per_branch)
        for address in choices.addresses():
            if address not in known:
                raise UnknownAddressError(
                    f"{self.__name__}: {what} {format_address(address)} names no random choice "
                    f"of any branch. Their addresses: {sorted(known)}."
                )
        return [choices.filter(select(*a)) if a else ChoiceMap() for a in per_branch]

    def _switch(self, index, fns, *operands):
        try:
            return jax.lax.switch(jnp.asarray(index), fns, *operands)
        except TypeError as e:
            raise ArgumentError(
                f"{self.__name__}: every branch must return a value of the same structure, "
                f"shapes and dtypes. JAX says: {e}"
            ) from None

    def _slots(self, i, tr, structs):
        return tuple(tr if j == i else _zeros(structs[j]) for j in range(len(self.branches)))

    def _simulate(self, key, args):
        index, bargs = args[0], args[1:]
        structs = self._structs(bargs)

        def branch(i):
            def run(k):
                tr = self.branches[i].simulate(k, bargs)
                return self._slots(i, tr, structs), tr.retval, tr.score
            return run

        slots, retval, score = self._switch(index, [branch(i) for i in range(len(self.branches))], key)
        return Trace(self, args, retval, score, slots)

    def _assess(self, choices, args):
        index, bargs = args[0], args[1:]
        structs = self._structs(bargs)
        parts = self._split(choices, structs, "choice")

        def branch(i):
            # A branch that is not chosen still traces: fill its missing choices with zeros.
            filled = _zeros(structs[i].choices).merge(parts[i])
            return lambda: self.branches[i].assess(filled, bargs)

        return self._switch(index, [branch(i) for i in range(len(self.branches))])

    def _generate(self, key, constraints, args):
        index, bargs = args[0], args[1:]
        structs = self._structs(bargs)
        parts = self._split(constraints, structs, "constraint")

        def branch(i):
            def run(k):
                tr, w = self.branches[i].generate(k, parts[i], bargs)
                return self._slots(i, tr, structs), tr.retval, tr.score, w
            return run

        slots, retval, score, w = self._switch(index, [branch(i) for i in range(len(self.branches))], key)
        return Trace(self, args, retval, score, slots), w

    def _move(self, key, trace, args, same, moved):
        """New trace at index `args[0]` from `trace`: branch i runs `same(i, k, old_slot)`
        when the index did not change and `moved(i, k)` when it did; both give (trace, w)."""
        old_index, index, bargs = trace.args[0], args[0], args[1:]
        structs = self._structs(bargs)

        def branch(i):
            def run(k, slots):
                tr, w = jax.lax.cond(
                    old_index == i, lambda: same(i, k, slots[i]), lambda: moved(i, k)
                )
                return self._slots(i, tr, structs), tr.retval, tr.score, w
            return run

        fns = [branch(i) for i in range(len(self.branches))]
        slots, retval, score, w = self._switch(index, fns, key, trace.inner)
        return Trace(self, args, retval, score, slots), w

    def _update(self, key, trace, constraints, args):
        parts = self._split(constraints, self._structs(args[1:]), "constraint")

        def same(i, k, old):
            tr, w, _ = self.branches[i].update(k, old, parts[i], args[1:])
            return tr, w

        def moved(i, k):  # new branch from the prior; every old choice is discarded
            tr, w = self.branches[i].generate(k, parts[i], args[1:])
            return tr, w - trace.score

        new, w = self._move(key, trace, args, same, moved)
        changed = select(*constraints.addresses())
        return new, w, trace.choices.filter(changed) if not constraints.is_empty else ChoiceMap()

    def _regenerate(self, key, trace, selection, args):
        old_fixed = self._project(trace, Selection.none())

        def same(i, k, old):
            return self.branches[i]._regenerate(k, old, selection, args[1:])

        def moved(i, k):  # every choice fresh from the prior: only factors weigh
            tr = self.branches[i].simulate(k, args[1:])
            return tr, self.branches[i]._project(tr, Selection.none()) - old_fixed

        return self._move(key, trace, args, same, moved)

    def _project(self, trace, selection):
        fns = [
            (lambda slots, i=i: self.branches[i]._project(slots[i], selection))
            for i in range(len(self.branches))
        ]
        return jax.lax.switch(jnp.asarray(trace.args[0]), fns, trace.inner)

    def _choices(self, trace):
        index = jnp.asarray(trace.args[0])
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
                chosen = jnp.reshape(index == j, index.shape + (1,) * (jnp.ndim(value) - index.ndim))
                value = jnp.where(chosen, other, value)
            merged[address] = value
        return ChoiceMap(merged)


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
