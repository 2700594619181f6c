"""Exception types of the traced core.

Every user mistake the core can detect while tracing raises one of these, with the
address, what was written, what was expected and the fix. They subclass the builtin
exception a Python user would catch for the same mistake (`ValueError`, `TypeError`,
`KeyError`-like lookups stay `ValueError` so messages print unquoted).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "PPLError",
    "AddressError",
    "DuplicateAddressError",
    "UnknownAddressError",
    "ObservationError",
    "ArgumentError",
    "InferenceError",
    "ControlFlowError",
]


class PPLError(Exception):
    """Base class of every error this framework raises on purpose."""


class AddressError(PPLError, ValueError):
    """An address is malformed, missing or used twice."""


class DuplicateAddressError(AddressError):
    """The same address was visited twice in one execution of a generative function."""


class UnknownAddressError(AddressError, KeyError):
    """A constraint, choice or selection names an address the model does not have.

    Also a `KeyError`, so `Mapping.get` and `in` behave as for a dict.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ObservationError(PPLError, ValueError):
    """An observed or constrained value does not fit its site (shape, support, finiteness)."""


class ArgumentError(PPLError, TypeError, ValueError):
    """A generative function was called with malformed or missing arguments.

    Both a `TypeError` (as Python raises for a bad call) and a `ValueError`.
    """


class ControlFlowError(PPLError, TypeError):
    """A traced value (a random choice) decides Python control flow inside a model body."""


class InferenceError(PPLError, RuntimeError):
    """An inference run cannot produce a meaningful answer (e.g. every weight is -inf)."""


def normalize_address(address) -> tuple:
    """`'x'` -> `('x',)`; a tuple path is checked and returned; `()` is the root."""
    if isinstance(address, str):
        return (address,)
    if isinstance(address, tuple) and all(isinstance(a, str) for a in address):
        return address
    if isinstance(address, tuple) and any(isinstance(a, int) for a in address):
        raise AddressError(
            f"address {address!r} holds an integer; addresses are strings only. The choices "
            "of ppl.scan and ppl.vmap are stacked arrays with the time (or element) axis "
            "first: constrain {'y': ys} with ys holding every step. To condition on some "
            "steps only, give every step and mask the unobserved ones in the kernel "
            "(dist.Normal(...).mask(is_observed)), or advance the scan step by step (SMC)."
        )
    raise AddressError(
        f"address {address!r} is not a string or a tuple of strings; write 'x' for a "
        "site or ('sub', 'x') for a site inside a nested generative function."
    )


def format_address(address) -> str:
    """Render an address the way a user writes it: 'x' or ('sub', 'x')."""
    if isinstance(address, tuple) and len(address) == 1:
        address = address[0]
    return repr(address)


def suggest(name, candidates: Iterable) -> str:
    """' Did you mean ...?' naming the closest candidate by its full path, or ''.

    A candidate whose last part equals the name's (the right site, wrong nesting) wins;
    otherwise the closest full path, then the closest last part.
    """
    path = name if isinstance(name, tuple) else (name,)
    candidates = [c if isinstance(c, tuple) else (c,) for c in candidates]
    if not path or not candidates:
        return ""
    same_leaf = [c for c in candidates if c[-1] == path[-1] and c != path]
    if same_leaf:
        return f" Did you mean {format_address(min(same_leaf, key=len))}?"
    rendered = {format_address(c): c for c in candidates}
    close = difflib.get_close_matches(format_address(path), list(rendered), n=1, cutoff=0.5)
    if not close:
        leaves = {c[-1]: c for c in candidates}
        near = difflib.get_close_matches(path[-1], list(leaves), n=1, cutoff=0.6)
        close = [format_address(leaves[near[0]])] if near else []
    return f" Did you mean {close[0]}?" if close else ""
