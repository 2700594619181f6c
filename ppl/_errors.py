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


class InferenceError(PPLError, RuntimeError):
    """An inference run cannot produce a meaningful answer (e.g. every weight is -inf)."""


def normalize_address(address) -> tuple:
    """`'x'` -> `('x',)`; a tuple path is checked and returned; `()` is the root."""
    if isinstance(address, str):
        return (address,)
    if isinstance(address, tuple) and all(isinstance(a, str) for a in address):
        return address
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
    """' Did you mean ...?' for the closest candidate address, or ''."""
    rendered = {format_address(c): c for c in candidates}
    close = difflib.get_close_matches(format_address(name), list(rendered), n=1, cutoff=0.5)
    return f" Did you mean {close[0]}?" if close else ""
