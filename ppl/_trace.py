"""`Trace`: the record of one execution of a generative function.

A trace is a registered pytree. Its static part is the generative function; its leaves
are the arguments, the return value, the score and a generative-function-specific
`inner` record (per-site values and log densities for a DSL function, the stacked
kernel trace for `vmap`/`scan`, ...). Traces of one generative function with the same
static structure have the same pytree structure, so a batch of traces (particles) is
`jax.vmap(gf.simulate, in_axes=(0, None))(keys, args)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax

from ._errors import normalize_address
from ._static import combine, partition

if TYPE_CHECKING:
    from ._choicemap import ChoiceMap
    from ._gfi import GenerativeFunction

__all__ = ["Trace"]


@jax.tree_util.register_pytree_node_class
class Trace:
    """One execution of `gen_fn` on `args`.

    Fields:
      gen_fn:  the generative function (static).
      args:    the argument tuple.
      retval:  the return value.
      score:   log p(choices) plus every factor: the log joint density, sign as usual
               (a log density, not its negation).
      inner:   gen_fn-specific record the other fields are derived from.

    `trace.choices` is the `ChoiceMap` of every random choice; `trace[address]` is the
    value at an address (a string or a tuple path). For a batch of traces the leaves
    carry a leading particle axis: `traces["slope"].shape == (num_particles,)`.
    """

    __slots__ = ("gen_fn", "args", "retval", "score", "inner", "_static")

    def __init__(self, gen_fn: GenerativeFunction, args: tuple, retval: Any, score, inner: Any, _static=None):
        self.gen_fn = gen_fn
        self.args = args
        self.retval = retval
        self.score = score
        self.inner = inner
        # Which argument leaves are structure, decided once from the real values: JAX
        # rebuilds pytrees with placeholder leaves (axis specs, sentinels), which must
        # keep the same structure.
        self._static = partition(args)[1] if _static is None else _static

    @property
    def choices(self) -> ChoiceMap:
        """Every random choice of the execution, as a `ChoiceMap`."""
        return self.gen_fn._choices(self)

    def __getitem__(self, address):
        """The value at `address`: a random choice, or an observed, deterministic,
        reward or factor value of the model."""
        choices = self.choices
        if address in choices:
            return choices[address]
        return self.gen_fn._lookup(self, normalize_address(address))

    # GenJAX spellings, for users moving over (same values, same signs).
    def get_choices(self) -> ChoiceMap:
        return self.choices

    def get_score(self):
        return self.score

    def get_retval(self):
        return self.retval

    def get_args(self) -> tuple:
        return self.args

    def __repr__(self) -> str:
        name = getattr(self.gen_fn, "__name__", type(self.gen_fn).__name__)
        return f"Trace({name}, score={self.score!r}, choices={self.choices!r})"

    # Python ints, bools, strings and None in `args` are static: part of the trace's
    # structure, as jax.jit's static arguments, so a trace carried through lax.scan (every
    # MCMC and SMC loop) keeps `n` in `dist.Normal(...).expand((n,))` a Python int.
    def tree_flatten(self):
        static = self._static
        fixed = {i for i, _ in static.static_leaves}
        leaves = jax.tree.leaves(self.args, is_leaf=lambda x: x is None)
        dynamic = [leaf for i, leaf in enumerate(leaves) if i not in fixed]
        return (dynamic, self.retval, self.score, self.inner), (self.gen_fn, static)

    @classmethod
    def tree_unflatten(cls, aux, children):
        gen_fn, static = aux
        dynamic, retval, score, inner = children
        return cls(gen_fn, combine(dynamic, static), retval, score, inner, static)
