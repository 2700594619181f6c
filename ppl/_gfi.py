"""The generative function interface (GFI).

Every model, distribution and combinator subclasses `GenerativeFunction` and answers
the program transformations below. The public methods check the user's input once, at
trace time, and call the private `_method` a subclass implements; inference code calls
only the public methods.

| method | returns |
|---|---|
| `simulate(key, args)` | `Trace` |
| `assess(choices, args)` | `(log_density, retval)` |
| `generate(key, constraints, args)` | `(Trace, log_weight)` |
| `update(key, trace, constraints, args)` | `(Trace, log_weight, discard)` |
| `regenerate(key, trace, selection)` | `(Trace, log_weight)` |
| `project(trace, selection)` | `log_weight` |
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import _keys
from ._choicemap import ChoiceMap
from ._errors import ArgumentError, UnknownAddressError, format_address, suggest
from ._selection import Selection, select
from ._static import partition, combine
from ._trace import Trace

__all__ = ["GenerativeFunction", "check_key", "check_args", "as_selection"]

_REGENERATE_STREAM = 0x5E6E


class GenerativeFunction:
    """Base class: a stochastic program with a density over its random choices.

    Subclasses implement `_simulate`, `_assess`, `_generate`, `_update`, `_regenerate`,
    `_project` and `_choices`. All of them are pure functions of their inputs, so they
    compose with `jax.jit`, `jax.vmap`, `jax.lax.scan` and `jax.grad`.
    """

    __name__ = "generative_function"

    # -- the interface -----------------------------------------------------------------
    def simulate(self, key, args: tuple) -> Trace:
        """Run forward with `key`, recording every random choice.

        `trace.score` = log p(choices) + factors.
        """
        key = check_key(key, self, "simulate")
        args = check_args(args, self, "simulate")
        _check_eagerly(self, "simulate", self._simulate, key, args)
        return self._simulate(key, args)

    def assess(self, choices, args: tuple) -> tuple[jax.Array, Any]:
        """`(log p(choices) + factors, retval)` for a complete set of choices."""
        args = check_args(args, self, "assess")
        choices = ChoiceMap.of(choices)
        _check_eagerly(self, "assess", self._assess, choices, args)
        return self._assess(choices, args)

    def generate(self, key, constraints, args: tuple) -> tuple[Trace, jax.Array]:
        """Constrain the given addresses, sample the rest from the prior.

        Returns `(trace, log_weight)` with `log_weight` = log p(constraints, factors | rest):
        the importance weight of the trace under the prior as proposal.
        """
        key = check_key(key, self, "generate")
        args = check_args(args, self, "generate")
        constraints = ChoiceMap.of(constraints)
        _check_eagerly(self, "generate", self._generate, key, constraints, args)
        return self._generate(key, constraints, args)

    def update(self, key, trace: Trace, constraints, args: tuple) -> tuple[Trace, jax.Array, ChoiceMap]:
        """Move `trace` to new `args` and the values in `constraints`.

        Returns `(new_trace, log_weight, discard)`: `log_weight` = new score - old score
        (choices that appear only in the new trace are drawn from the prior and cancel),
        `discard` holds the previous values of the changed or removed choices.
        """
        key = check_key(key, self, "update")
        args = check_args(args, self, "update")
        _check_trace(trace, self, "update")
        constraints = ChoiceMap.of(constraints)
        _check_eagerly(self, "update", self._update, key, trace, constraints, args)
        return self._update(key, trace, constraints, args)

    def regenerate(self, key, trace: Trace, selection) -> tuple[Trace, jax.Array]:
        """Resample the selected addresses from their prior, keep the rest.

        `log_weight` = sum over unselected sites of (new log density - old log density)
        plus the change in factors: the log Metropolis-Hastings ratio of the move with
        the prior as proposal.
        """
        key = check_key(key, self, "regenerate")
        _check_trace(trace, self, "regenerate")
        selection = as_selection(selection)
        check_selection(selection, trace, f"{self.__name__}.regenerate")
        # A distinct stream: regenerating with the key that simulated the trace (a common
        # slip) must still move the selected choices instead of redrawing the same values.
        key = _keys.fold(key, _REGENERATE_STREAM)
        run = lambda k, t: self._regenerate(k, t, selection, t.args)  # noqa: E731
        _check_eagerly(self, "regenerate", run, key, trace)
        return run(key, trace)

    def project(self, trace: Trace, selection) -> jax.Array:
        """Log density of the selected choices plus every factor and observed site.

        `project(trace, Selection.all()) == trace.score`.
        """
        _check_trace(trace, self, "project")
        selection = as_selection(selection)
        check_selection(selection, trace, f"{self.__name__}.project")
        return self._project(trace, selection)

    # -- combinator sugar ------------------------------------------------------------------
    def vmap(self, in_axes=0) -> GenerativeFunction:
        """`ppl.vmap(self, in_axes)`."""
        from ._vmap import vmap

        return vmap(self, in_axes)

    def scan(self, length: int | None = None) -> GenerativeFunction:
        """`ppl.scan(self, length)`."""
        from ._scan import scan

        return scan(self, length)

    def mask(self) -> GenerativeFunction:
        """`ppl.mask(self)`."""
        from ._mask import mask

        return mask(self)

    # -- what subclasses implement -----------------------------------------------------------
    def _simulate(self, key, args):
        raise NotImplementedError

    def _assess(self, choices, args):
        raise NotImplementedError

    def _generate(self, key, constraints, args):
        raise NotImplementedError

    def _update(self, key, trace, constraints, args):
        raise NotImplementedError

    def _regenerate(self, key, trace, selection, args):
        """Regenerate with (possibly) new args: a nested call's args change when an
        upstream selected choice is resampled."""
        raise NotImplementedError

    def _project(self, trace, selection):
        raise NotImplementedError

    def _choices(self, trace) -> ChoiceMap:
        raise NotImplementedError

    # Whether `_score_from_inner` recomputes the score exactly from the trace's `inner`.
    # Combinators that stack element traces (vmap, scan) then store no per-element score.
    _score_derivable = False

    def _score_from_inner(self, inner):
        """The score of a trace of this function, recomputed from its `inner` record."""
        raise NotImplementedError

    def _check_arity(self, args: tuple, method: str) -> None:
        """Raise `ArgumentError` if `args` cannot be the arguments of this function."""

    def _lookup(self, trace, path: tuple):
        """The value of a non-choice site at `path` (observed, deterministic, ...)."""
        raise UnknownAddressError(
            f"{self.__name__}: the trace has no value at {format_address(path)}. Its random "
            f"choices: {', '.join(format_address(a) for a in trace.choices.addresses()) or '(none)'}."
            + suggest(path, trace.choices.addresses())
        )

    def _site_scores(self, trace, path: tuple):
        """Yield `(address, log_density)` of the sites of `trace`, for diagnostics."""
        yield path, trace.score

    def __call__(self, *args, **kwargs):
        raise ArgumentError(
            f"{self.__name__} is a generative function; it is not called directly. Inside a "
            f"model write ppl.sample('address', {self.__name__}, *args); outside, use "
            f"{self.__name__}.simulate(key, args) or another GFI method."
        )


class Combinator(GenerativeFunction):
    """A generative function built from other parts (`ppl.vmap(f)`, `ppl.switch(f, g)`, ...).

    Two built from equal parts are equal and hash alike, so that `ppl.vmap(f)` written
    twice is one function to `jax.jit`'s caches (the function is part of a trace's static
    structure). Subclasses say what their parts are."""

    def _parts(self) -> tuple:
        raise NotImplementedError

    def __eq__(self, other):
        return type(other) is type(self) and other._parts() == self._parts()

    def __hash__(self):
        def hashable(part):
            try:
                hash(part)
            except TypeError:
                return repr(part)
            return part

        return hash((type(self),) + tuple(hashable(p) for p in self._parts()))


def _where(gen_fn, method: str) -> str:
    """How messages name the call: 'model.simulate', or an inference entry point's name."""
    return method if "." in method or gen_fn is None else f"{gen_fn.__name__}.{method}"


def check_key(key, gen_fn, method: str):
    """A `jax.random` key (typed, or a raw uint32 pair), a `ppl.ParticleKey`, or an
    `ArgumentError`. `method` is 'simulate' (named as gen_fn.simulate) or a dotted name
    such as 'inference.importance' (used as is)."""
    where = _where(gen_fn, method)
    if isinstance(key, _keys.ParticleKey):
        return key
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ArgumentError(
                f"{where}: expected one key, got a batch of shape {key.shape}. "
                f"Use jax.vmap over the call to run a batch."
            )
        return key
    if dtype == jnp.uint32 and getattr(key, "shape", None) == (2,):
        return key
    raise ArgumentError(
        f"{where}: the first argument must be a jax.random key, "
        f"got {type(key).__name__}{'' if dtype is None else f' of dtype {dtype}'}. "
        "Create one with jax.random.key(0) and split it for every call."
    )


def check_args(args, gen_fn, method: str) -> tuple:
    """The argument tuple, checked against the function's signature where known.

    `args` must be a tuple (as in `jax.lax` and GenJAX): a list is refused rather than
    converted, because a list is also a valid single pytree argument.
    """
    where = _where(gen_fn, method)
    if not isinstance(args, tuple):
        fix = "tuple(args)" if isinstance(args, list) else f"({_arg_hint(args)},) with the trailing comma"
        raise ArgumentError(
            f"{where}: `args` must be a tuple of the arguments, got "
            f"{type(args).__name__}. Write {fix}; for no arguments write ()."
        )
    try:
        gen_fn._check_arity(args, method)
    except ArgumentError as e:
        raise ArgumentError(
            f"{where}: {e} The args tuple holds the function's arguments in "
            f"order, e.g. {where}(..., (xs,))."
        ) from None
    return args


def check_selection(selection: Selection, trace: Trace, where: str) -> None:
    """Every address a selection names must reach a random choice of the trace."""
    named = selection._named_paths()
    if not named:
        return
    choices = trace.choices
    addresses = choices.addresses()
    for path in named:
        if path and path not in choices and not any(a[: len(path)] == path for a in addresses):
            raise UnknownAddressError(
                f"{where}: the selection names {format_address(path)}, which is not a random "
                f"choice of the trace. Its random choices: "
                f"{', '.join(format_address(a) for a in addresses) or '(none)'}."
                + suggest(path, addresses)
            )


# Model bodies run eagerly (outside jit/vmap) see concrete values, so a Python `if` on a
# random value would silently take one branch. The first eager call of each signature
# also traces the method abstractly (jax.eval_shape), where such control flow raises
# ControlFlowError naming the line; later calls with the same signature skip it.
_EAGER_CHECKED: set = set()


def _check_eagerly(gen_fn, method: str, fn, *inputs) -> None:
    from ._interpreter import in_model

    leaves = jax.tree.leaves(inputs)
    if in_model() or any(isinstance(x, jax.core.Tracer) for x in leaves):
        return
    dynamic, static = partition(inputs)
    try:
        signature = (gen_fn, method, static, tuple((jnp.shape(x), str(getattr(x, 'dtype', type(x)))) for x in dynamic))
        hash(signature)
    except TypeError:
        return
    if signature in _EAGER_CHECKED:
        return
    jax.eval_shape(lambda dyn: fn(*combine(dyn, static)), dynamic)
    _EAGER_CHECKED.add(signature)


def as_selection(selection) -> Selection:
    """Accept a `Selection`, one address, or a list of addresses."""
    if isinstance(selection, Selection):
        return selection
    if isinstance(selection, (str, tuple)):
        return select(selection)
    if isinstance(selection, (list, set, frozenset)):
        return select(*selection)
    raise ArgumentError(
        f"expected a selection, got {type(selection).__name__}; build one with "
        "ppl.select('x', ('sub', 'z'))."
    )


def _check_trace(trace, gen_fn, method: str) -> None:
    if not isinstance(trace, Trace):
        raise ArgumentError(
            f"{gen_fn.__name__}.{method}: expected a Trace (from simulate or generate), "
            f"got {type(trace).__name__}."
        )
    if trace.gen_fn != gen_fn:
        raise ArgumentError(
            f"{gen_fn.__name__}.{method}: the trace was made by "
            f"{getattr(trace.gen_fn, '__name__', trace.gen_fn)}, not by {gen_fn.__name__}."
        )


def _arg_hint(x) -> str:
    shape = getattr(x, "shape", None)
    return "x" if shape is None else f"<array of shape {tuple(shape)}>"
