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

from ._choicemap import ChoiceMap
from ._selection import Selection, select
from ._errors import ArgumentError
from ._trace import Trace

__all__ = ["GenerativeFunction", "check_key", "check_args"]

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
        return self._simulate(key, args)

    def assess(self, choices, args: tuple) -> tuple[jax.Array, Any]:
        """`(log p(choices) + factors, retval)` for a complete set of choices."""
        args = check_args(args, self, "assess")
        return self._assess(ChoiceMap.of(choices), args)

    def generate(self, key, constraints, args: tuple) -> tuple[Trace, jax.Array]:
        """Constrain the given addresses, sample the rest from the prior.

        Returns `(trace, log_weight)` with `log_weight` = log p(constraints, factors | rest):
        the importance weight of the trace under the prior as proposal.
        """
        key = check_key(key, self, "generate")
        args = check_args(args, self, "generate")
        return self._generate(key, ChoiceMap.of(constraints), args)

    def update(self, key, trace: Trace, constraints, args: tuple) -> tuple[Trace, jax.Array, ChoiceMap]:
        """Move `trace` to new `args` and the values in `constraints`.

        Returns `(new_trace, log_weight, discard)`: `log_weight` = new score - old score
        (choices that appear only in the new trace are drawn from the prior and cancel),
        `discard` holds the previous values of the changed or removed choices.
        """
        key = check_key(key, self, "update")
        args = check_args(args, self, "update")
        _check_trace(trace, self, "update")
        return self._update(key, trace, ChoiceMap.of(constraints), args)

    def regenerate(self, key, trace: Trace, selection) -> tuple[Trace, jax.Array]:
        """Resample the selected addresses from their prior, keep the rest.

        `log_weight` = sum over unselected sites of (new log density - old log density)
        plus the change in factors: the log Metropolis-Hastings ratio of the move with
        the prior as proposal.
        """
        key = check_key(key, self, "regenerate")
        _check_trace(trace, self, "regenerate")
        # A distinct stream: regenerating with the key that simulated the trace (a common
        # slip) must still move the selected choices instead of redrawing the same values.
        key = jax.random.fold_in(key, _REGENERATE_STREAM)
        return self._regenerate(key, trace, as_selection(selection), trace.args)

    def project(self, trace: Trace, selection) -> jax.Array:
        """Log density of the selected choices plus every factor and observed site.

        `project(trace, Selection.all()) == trace.score`.
        """
        _check_trace(trace, self, "project")
        return self._project(trace, as_selection(selection))

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

    def _check_arity(self, args: tuple, method: str) -> None:
        """Raise `ArgumentError` if `args` cannot be the arguments of this function."""

    def _site_scores(self, trace, path: tuple):
        """Yield `(address, log_density)` of the sites of `trace`, for diagnostics."""
        yield path, trace.score

    def __call__(self, *args, **kwargs):
        raise ArgumentError(
            f"{self.__name__} is a generative function; it is not called directly. Inside a "
            f"model write ppl.sample('address', {self.__name__}, *args); outside, use "
            f"{self.__name__}.simulate(key, args) or another GFI method."
        )


def check_key(key, gen_fn, method: str):
    """A `jax.random` key (typed, or a raw uint32 pair) or an `ArgumentError`."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ArgumentError(
                f"{gen_fn.__name__}.{method}: expected one key, got a batch of shape {key.shape}. "
                f"Use jax.vmap({gen_fn.__name__}.{method}, ...) to run a batch."
            )
        return key
    if dtype == jnp.uint32 and getattr(key, "shape", None) == (2,):
        return key
    raise ArgumentError(
        f"{gen_fn.__name__}.{method}: the first argument must be a jax.random key, "
        f"got {type(key).__name__}{'' if dtype is None else f' of dtype {dtype}'}. "
        "Create one with jax.random.key(0) and split it for every call."
    )


def check_args(args, gen_fn, method: str) -> tuple:
    """The argument tuple, checked against the function's signature where known."""
    if isinstance(args, list):
        args = tuple(args)
    if not isinstance(args, tuple):
        raise ArgumentError(
            f"{gen_fn.__name__}.{method}: `args` must be a tuple of the arguments, got "
            f"{type(args).__name__}. For a single argument write ({_arg_hint(args)},) "
            "with the trailing comma; for none write ()."
        )
    try:
        gen_fn._check_arity(args, method)
    except ArgumentError as e:
        raise ArgumentError(
            f"{gen_fn.__name__}.{method}: {e} The args tuple holds the function's arguments in "
            f"order, e.g. {gen_fn.__name__}.{method}(..., (xs,))."
        ) from None
    return args


def as_selection(selection) -> Selection:
    """Accept a `Selection`, one address, or a list of addresses."""
    if isinstance(selection, Selection):
        return selection
    if isinstance(selection, (str, tuple)):
        return select(selection)
    if isinstance(selection, (list, set, frozenset)):
        return select(*selection)
    raise TypeError(
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
