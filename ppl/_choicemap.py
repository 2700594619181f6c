"""Choice maps: immutable address -> value pytrees.

An address is a string naming one site of a generative function, or a tuple path
`("sub", "z")` reaching into nested generative functions. A `ChoiceMap` is immutable
and a registered pytree, so it passes through `jit`, `vmap`, `scan` and `grad`;
under the `vmap`/`scan` combinators its leaves are stacked with the mapped axis first.
Plain nested dicts are accepted wherever a choice map is (`ChoiceMap.of`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from ._errors import (
    AddressError,
    ArgumentError,
    ObservationError,
    UnknownAddressError,
    format_address,
    normalize_address,
    suggest,
)

if TYPE_CHECKING:
    from ._selection import Selection

__all__ = ["ChoiceMap", "check_leading_axis"]

_NO_VALUE = object()


@jax.tree_util.register_pytree_node_class
class ChoiceMap(Mapping):
    """Immutable map from addresses to the values of random choices.

    >>> cm = ChoiceMap({"slope": 1.0, "sub": {"z": 2.0}})
    >>> cm["slope"], cm["sub", "z"], cm[("sub", "z")]
    (1.0, 2.0, 2.0)
    >>> sorted(cm.addresses())
    [('slope',), ('sub', 'z')]

    A node holds either a value (a leaf; reach it with `cm[()]`) or sub-maps keyed by
    string. Iteration and `len` are over the top-level keys.
    """

    __slots__ = ("_value", "_submaps")

    def __init__(self, mapping: Mapping | None = None):
        submaps: dict[str, Any] = {}
        for key, val in (mapping or {}).items():
            path = normalize_address(key)
            if not path:
                raise AddressError("the empty address () cannot be a key of a choice map")
            _insert(submaps, path, val)
        object.__setattr__(self, "_value", _NO_VALUE)
        object.__setattr__(self, "_submaps", submaps)

    # -- constructors ----------------------------------------------------------------
    @classmethod
    def of(cls, x) -> ChoiceMap:
        """Coerce `None`, a nested dict or a choice map into a `ChoiceMap`."""
        if isinstance(x, ChoiceMap):
            return x
        if x is None:
            return cls()
        if isinstance(x, Mapping):
            return cls(x)
        raise ArgumentError(
            f"expected a ChoiceMap or a dict of address -> value, got {type(x).__name__}. "
            "Write constraints as {'y': ys} or {('sub', 'z'): z}."
        )

    @classmethod
    def leaf(cls, value) -> ChoiceMap:
        """A choice map holding one value at the root address `()`."""
        cm = cls()
        object.__setattr__(cm, "_value", value)
        return cm

    @classmethod
    def _from_parts(cls, value, submaps: dict) -> ChoiceMap:
        cm = cls()
        object.__setattr__(cm, "_value", value)
        object.__setattr__(cm, "_submaps", submaps)
        return cm

    __eq__ = object.__eq__  # Mapping's value equality is ambiguous on arrays
    __hash__ = object.__hash__

    def __setattr__(self, name, value):
        raise AttributeError("ChoiceMap is immutable; build a new one with merge or ChoiceMap({...})")

    # -- queries -----------------------------------------------------------------------
    @property
    def has_value(self) -> bool:
        """True for a leaf node (a value at this address)."""
        return self._value is not _NO_VALUE

    @property
    def is_empty(self) -> bool:
        return not self.has_value and not self._submaps

    def _node(self, address):
        node = self
        for part in normalize_address(address):
            if node.has_value or part not in node._submaps:
                return None
            child = node._submaps[part]
            node = child if isinstance(child, ChoiceMap) else ChoiceMap.leaf(child)
        return node

    def __getitem__(self, address):
        node = self._node(address)
        if node is None or node.is_empty:
            raise UnknownAddressError(
                f"choice map has no value at {format_address(address)}. Its addresses: "
                f"{', '.join(format_address(a) for a in self.addresses()) or '(none)'}."
                + suggest(address, self.addresses())
            )
        return node._value if node.has_value else node

    def get_submap(self, address) -> ChoiceMap:
        """The choice map under `address` (empty if absent; a leaf map at a value)."""
        node = self._node(address)
        return ChoiceMap() if node is None else node

    def __contains__(self, address) -> bool:
        try:
            node = self._node(address)
        except AddressError:
            return False
        return node is not None and not node.is_empty

    def __iter__(self) -> Iterator[str]:
        return iter(self._submaps)

    def __len__(self) -> int:
        return len(self._submaps)

    def addresses(self) -> list[tuple]:
        """Tuple paths of every leaf value, depth first in key order."""
        if self.has_value:
            return [()]
        out = []
        for key in sorted(self._submaps):
            child = self._submaps[key]
            if isinstance(child, ChoiceMap):
                out.extend((key,) + a for a in child.addresses())
            else:
                out.append((key,))
        return out

    def flat_items(self) -> list[tuple[tuple, Any]]:
        """`(address, value)` for every leaf; a leaf map gives `[((), value)]`."""
        return [(a, self[a]) for a in self.addresses()]

    def to_dict(self) -> dict:
        """Nested plain dicts of the values (a leaf map returns its value)."""
        if self.has_value:
            return self._value
        return {
            k: (v.to_dict() if isinstance(v, ChoiceMap) else v) for k, v in self._submaps.items()
        }

    def merge(self, other) -> ChoiceMap:
        """A new map with the addresses of both; `other` wins where both have a value."""
        other = ChoiceMap.of(other)
        if other.has_value or self.has_value:
            return other if other.has_value or self.is_empty else self
        merged = dict(self._submaps)
        for key, val in other._submaps.items():
            mine = merged.get(key)
            if isinstance(mine, ChoiceMap) and isinstance(val, ChoiceMap):
                merged[key] = mine.merge(val)
            else:
                merged[key] = val
        return ChoiceMap._from_parts(_NO_VALUE, merged)

    def filter(self, selection: Selection) -> ChoiceMap:
        """The sub-map of the selected addresses."""
        if self.has_value:
            return self if () in selection else ChoiceMap()
        out = {}
        for key, val in self._submaps.items():
            if (key,) in selection:
                out[key] = val
            elif isinstance(val, ChoiceMap):
                sub = val.filter(selection.submap(key))
                if not sub.is_empty:
                    out[key] = sub
        return ChoiceMap._from_parts(_NO_VALUE, out)

    def __repr__(self) -> str:
        if self.has_value:
            return f"ChoiceMap.leaf({_short(self._value)})"
        items = ", ".join(
            f"{format_address(a)}: {_short(self[a])}" for a in self.addresses()
        )
        return f"ChoiceMap({{{items}}})"

    # -- pytree ------------------------------------------------------------------------
    def tree_flatten(self):
        keys = tuple(sorted(self._submaps))
        children = tuple(self._submaps[k] for k in keys)
        if self.has_value:
            return (self._value,) + children, (True, keys)
        return children, (False, keys)

    @classmethod
    def tree_unflatten(cls, aux, children):
        has_value, keys = aux
        value = children[0] if has_value else _NO_VALUE
        rest = children[1:] if has_value else children
        return cls._from_parts(value, dict(zip(keys, rest)))


def check_leading_axis(choices: ChoiceMap, size: int, *, owner: str, what: str, axis: str) -> None:
    """Raise `ObservationError` unless every leaf of `choices` has leading axis `size`.

    For the choices of a combinator that stacks its kernel's traces (vmap, scan).
    """
    for address, value in choices.flat_items():
        shape = jnp.shape(value)
        if not shape or shape[0] != size:
            raise ObservationError(
                f"{owner}: {what} at {format_address(address)} has shape {shape}; it needs "
                f"the {axis} first, of size {size}."
            )


def _insert(submaps: dict, path: tuple, val) -> None:
    head, rest = path[0], path[1:]
    if isinstance(val, Mapping) and not isinstance(val, ChoiceMap):
        val = ChoiceMap(val)
    if rest:
        child = submaps.get(head)
        if child is None:
            child = ChoiceMap()
        elif not isinstance(child, ChoiceMap) or child.has_value:
            raise AddressError(f"address {format_address(path)} goes through a value at {head!r}")
        inner = dict(child._submaps)
        _insert(inner, rest, val)
        submaps[head] = ChoiceMap._from_parts(_NO_VALUE, inner)
    else:
        if head in submaps:
            raise AddressError(f"address {head!r} is given twice in one choice map")
        submaps[head] = val


def _short(v) -> str:
    shape = getattr(v, "shape", None)
    if shape:
        return f"{getattr(v, 'dtype', '')}{list(shape)}"
    if shape == () and not isinstance(v, jax.core.Tracer):
        return repr(v.item())  # a 0-d array prints as its number
    return repr(v)
