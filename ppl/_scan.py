"""`ppl.scan`: a kernel `(carry, x) -> (carry, y)` repeated with `jax.lax.scan`.

The standard form of a state-space model: called with args `(init_carry, xs)` (`xs`
may be None when `length` is given), it returns `(final_carry, ys)`. Step `t` draws
from `fold_in(key, t)`; the trace holds the kernel traces stacked over steps, so
choices carry a leading time axis, and so do constraints: `{"y": ys}` with
`ys.shape == (T, ...)` constrains `y` at every step.

A scan can also be advanced one step at a time (what a particle filter does):
`scan.step(key, t, carry, x, constraints_t)` runs step `t` alone, with the key the
whole run would give it, at a cost independent of `t`; `scan.assemble(args, steps)`
turns the stacked step traces back into the scan's trace. `update` re-runs only the
steps whose inputs (carry, x) or constraint values changed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _keys
from ._choicemap import ChoiceMap, check_leading_axis
from ._errors import ArgumentError
from ._gfi import GenerativeFunction
from ._selection import select
from ._stacked import StackedGF
from ._trace import Trace

__all__ = ["scan", "ScanGF"]


class ScanGF(StackedGF):
    """`kernel` applied `length` times, threading the carry."""

    def __init__(self, kernel: GenerativeFunction, length: int | None = None):
        if not isinstance(kernel, GenerativeFunction):
            raise ArgumentError(f"ppl.scan expects a generative function, got {type(kernel).__name__}")
        if length is not None and (not isinstance(length, int) or length < 0):
            raise ArgumentError(f"ppl.scan: length must be a non-negative int, got {length!r}")
        self.kernel = kernel
        self.element = kernel
        self.length = length
        self.__name__ = f"scan({kernel.__name__})"

    def _parts(self):
        return (self.kernel, self.length)

    def _check_arity(self, args, method):
        if len(args) != 2:
            raise ArgumentError(
                f"{self.__name__}.{method}: a scan is called with args (init_carry, xs), got "
                f"{len(args)} argument(s); pass xs=None when there is no per-step input."
            )

    def num_steps(self, args) -> int:
        """The number of steps for args `(init_carry, xs)`."""
        lengths = {jnp.shape(leaf)[0] for leaf in jax.tree.leaves(args[1])}
        if self.length is not None:
            lengths.add(self.length)
        if not lengths:
            raise ArgumentError(
                f"{self.__name__}: xs is None and no length was given; use ppl.scan(kernel, length=T)."
            )
        if len(lengths) > 1:
            raise ArgumentError(f"{self.__name__}: xs leading axes and length disagree: {sorted(lengths)}.")
        return lengths.pop()

    def _carry(self, carry):
        # A weakly typed init (a Python float) would not match the kernel's output carry.
        def strengthen(x):
            if isinstance(x, jax.Array) and not getattr(x, "weak_type", False):
                return x  # includes typed PRNG keys carried in the state
            return jnp.asarray(x, dtype=jnp.asarray(x).dtype)

        return jax.tree.map(strengthen, carry)

    def _split_retval(self, retval):
        if not (isinstance(retval, tuple) and len(retval) == 2):
            raise ArgumentError(
                f"{self.__name__}: the kernel {self.kernel.__name__} must return a pair "
                f"(new_carry, y), got {type(retval).__name__}."
            )
        return retval

    def _check_stacked(self, choices: ChoiceMap, size: int, what: str) -> None:
        check_leading_axis(choices, size, owner=self.__name__, what=what, axis="time axis")

    def _scan(self, step, carry, xs, length):
        try:
            return jax.lax.scan(step, self._carry(carry), xs, length=length)
        except TypeError as e:
            if "carry" not in str(e):
                raise
            raise ArgumentError(
                f"{self.__name__}: the kernel {self.kernel.__name__} must return a new carry of "
                f"the same structure, shapes and dtypes as the carry it receives. JAX says: {e}"
            ) from None

    def _wrap(self, args, final, trs):
        return Trace(self, args, (final, trs.retval[1]), jnp.sum(trs.score), self._stack(trs.args, trs))

    def _simulate(self, key, args):
        carry, xs = args
        length = self.num_steps(args)

        def step(c, tx):
            t, x = tx
            tr = self.kernel.simulate(_keys.step_key(key, t), (c, x))
            return self._split_retval(tr.retval)[0], tr

        final, trs = self._scan(step, carry, (jnp.arange(length), xs), length)
        return self._wrap(args, final, trs)

    def _assess(self, choices, args):
        carry, xs = args
        length = self.num_steps(args)
        self._check_stacked(choices, length, "choice")

        def step(c, cx):
            ch, x = cx
            lp, retval = self.kernel.assess(ch, (c, x))
            new_c, y = self._split_retval(retval)
            return new_c, (lp, y)

        final, (lps, ys) = self._scan(step, carry, (choices, xs), length)
        return jnp.sum(lps), (final, ys)

    def _generate(self, key, constraints, args):
        carry, xs = args
        length = self.num_steps(args)
        self._check_stacked(constraints, length, "constraint")

        def step(c, tcx):
            t, cons, x = tcx
            tr, w = self.kernel.generate(_keys.step_key(key, t), cons, (c, x))
            return self._split_retval(tr.retval)[0], (tr, w)

        final, (trs, ws) = self._scan(step, carry, (jnp.arange(length), constraints, xs), length)
        return self._wrap(args, final, trs), jnp.sum(ws)

    def _update(self, key, trace, constraints, args):
        carry, xs = args
        length = self.num_steps(args)
        if length != self.num_steps(trace.args):
            raise ArgumentError(
                f"{self.__name__}.update: the number of steps cannot change ({self.num_steps(trace.args)} -> {length})."
            )
        self._check_stacked(constraints, length, "constraint")

        def step(c, ttcx):
            t, old, cons, x = ttcx
            old = self._element(old.args, old.retval, old.score, old.inner)
            tr, w, discard = self._update_step(_keys.step_key(key, t), old, cons, (c, x))
            return self._split_retval(tr.retval)[0], (tr, w, discard)

        final, (trs, ws, discard) = self._scan(
            step, carry, (jnp.arange(length), trace.inner, constraints, xs), length
        )
        return self._wrap(args, final, trs), jnp.sum(ws), discard

    def _update_step(self, key, old: Trace, cons: ChoiceMap, args: tuple):
        """The kernel's update at one step, skipped where nothing it depends on changed.

        A step whose inputs `(carry, x)` equal the old step's and whose constraints equal
        the old values at their addresses gets back the old step trace, weight 0 and the
        old values as its discard: exactly what the kernel's update returns then, since
        with the same inputs no site is redrawn. The test runs on values (`lax.cond`), so
        changing one observation of a long scan re-runs that step and the steps its carry
        reaches, not all of them. (Under a batch of particles with a per-particle test,
        `vmap` turns the `cond` into a select that runs both branches.)
        """

        def redo(_):
            return self.kernel.update(key, old, cons, args)

        shapes = jax.eval_shape(redo, None)
        paths = cons.addresses()
        old_choices = old.choices
        kept_discard = old_choices.filter(select(*paths))
        same_structure = all(p in old_choices for p in paths) and (
            jax.tree.structure(kept_discard) == jax.tree.structure(shapes[2])
            and jax.tree.structure(old) == jax.tree.structure(shapes[0])
        )
        if not same_structure:
            return redo(None)

        def keep(_):
            out = (old, jnp.zeros(()), kept_discard)
            return jax.tree.map(lambda v, s: jnp.asarray(v, s.dtype), out, shapes)

        new_in, old_in = jax.tree.leaves(args), jax.tree.leaves(old.args)
        if len(new_in) != len(old_in):
            return redo(None)
        unchanged = [jnp.all(a == b) for a, b in zip(new_in, old_in)]
        unchanged += [jnp.all(cons[p] == old_choices[p]) for p in paths]
        return jax.lax.cond(jnp.all(jnp.stack(unchanged)) if unchanged else True, keep, redo, None)

    def _regenerate(self, key, trace, selection, args):
        carry, xs = args
        length = self.num_steps(args)

        def step(c, ttx):
            t, old, x = ttx
            old = self._element(old.args, old.retval, old.score, old.inner)
            tr, w = self.kernel._regenerate(_keys.step_key(key, t), old, selection, (c, x))
            return self._split_retval(tr.retval)[0], (tr, w)

        final, (trs, ws) = self._scan(step, carry, (jnp.arange(length), trace.inner, xs), length)
        return self._wrap(args, final, trs), jnp.sum(ws)

    def _project(self, trace, selection):
        def one(t):
            return self.kernel._project(self._element(t.args, t.retval, t.score, t.inner), selection)

        return jnp.sum(jax.vmap(one)(trace.inner))

    # -- one step at a time -----------------------------------------------------------
    def step(self, key, t, carry, x=None, constraints=None):
        """Run step `t` alone: the kernel's `generate` at `(carry, x)` with this step's
        `constraints`, under the key step `t` of `self.generate(key, ...)` would use.

        Returns `(step_trace, log_weight, new_carry)`. The cost does not depend on `t`,
        so a filter that calls it for t = 0..T-1 (inside `lax.scan`, `t` traced) is
        linear in T. Stacking the step traces over t and passing them to `assemble`
        gives the trace `generate` would have returned.
        """
        tr, w = self.kernel.generate(_keys.step_key(key, t), constraints, (carry, x))
        return tr, w, self._split_retval(tr.retval)[0]

    def assemble(self, args, steps: Trace) -> Trace:
        """The scan's trace from its step traces stacked along a leading time axis."""
        length = self.num_steps(args)
        leading = {jnp.shape(leaf)[:1] for leaf in jax.tree.leaves(steps)}
        if leading != {(length,)}:
            raise ArgumentError(
                f"{self.__name__}.assemble: expected step traces stacked over {length} steps, got "
                f"leaves with leading axes {sorted(leading)}."
            )
        final = jax.tree.map(lambda leaf: leaf[-1], self._split_retval(steps.retval)[0])
        return self._wrap(args, final, steps)



def scan(kernel: GenerativeFunction, length: int | None = None) -> ScanGF:
    """Repeat `kernel: (carry, x) -> (carry, y)`; call with args `(init_carry, xs)`.

    >>> import numpyro.distributions as dist, ppl
    >>> @ppl.gen
    ... def step(z, _):
    ...     z = ppl.sample("z", dist.Normal(0.9 * z, 1.0))
    ...     return z, z
    >>> tr = ppl.scan(step, length=5).simulate(jax.random.key(0), (0.0, None))
    >>> tr["z"].shape
    (5,)
    """
    return ScanGF(kernel, length)
