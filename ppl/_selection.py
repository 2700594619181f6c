"""Selections: sets of addresses (the sites `regenerate` resamples, `project` weighs).

`addr in sel` is True when the whole site or sub-tree at `addr` is selected;
`sel.submap("sub")` is the selection inside a nested generative function.
"""

from __future__ import annotations

from ._errors import normalize_address

__all__ = ["Selection", "select"]


class Selection:
    """A set of addresses, e.g. the sites `regenerate` resamples.

    `addr in sel` is True when the whole site (or sub-tree) at `addr` is selected;
    `sel.submap("sub")` is the selection inside a nested generative function.

    >>> sel = select("slope", ("sub", "z"))
    >>> "slope" in sel, "noise" in sel, "z" in sel.submap("sub")
    (True, False, True)
    >>> "noise" in ~sel
    True
    """

    def __contains__(self, address) -> bool:
        raise NotImplementedError

    def submap(self, key: str) -> Selection:
        raise NotImplementedError

    def _any_below(self, address) -> bool:
        """Whether some address at or below `address` is selected."""
        raise NotImplementedError

    def _named_paths(self) -> list[tuple]:
        """The address paths this selection names explicitly (checked against traces)."""
        return []

    def __invert__(self) -> Selection:
        return _Complement(self)

    def __or__(self, other: Selection) -> Selection:
        return _Union(self, other)

    @staticmethod
    def all() -> Selection:
        """Every address."""
        return _ALL

    @staticmethod
    def none() -> Selection:
        """No address."""
        return _NONE


class _ConstantSel(Selection):
    """Every address (`selected=True`) or none."""

    def __init__(self, selected: bool):
        self._selected = selected

    def __contains__(self, address):
        return self._selected

    def _any_below(self, address):
        return self._selected

    def submap(self, key):
        return self

    def __repr__(self):
        return "Selection.all()" if self._selected else "Selection.none()"


_ALL = _ConstantSel(True)
_NONE = _ConstantSel(False)


class _AddressSel(Selection):
    """A trie of selected paths; a `True` leaf selects everything below it."""

    def __init__(self, trie: dict):
        self._trie = trie

    def _walk(self, address):
        """The trie node at `address`: True (selected at or above it), None (absent) or a dict."""
        node = self._trie
        for part in normalize_address(address):
            if node is True:
                return True
            if part not in node:
                return None
            node = node[part]
        return node

    def __contains__(self, address):
        return self._walk(address) is True

    def _any_below(self, address):
        node = self._walk(address)
        return node is True or bool(node)  # a selected leaf, or a non-empty sub-trie

    def _named_paths(self):
        return [p if isinstance(p, tuple) else (p,) for p in _paths(self._trie)]

    def submap(self, key):
        node = self._trie.get(key)
        if node is None:
            return _NONE
        return _ALL if node is True else _AddressSel(node)

    def __repr__(self):
        return f"select{tuple(_paths(self._trie))!r}"


def _paths(trie, prefix=()):
    for key, node in trie.items():
        if node is True:
            yield (prefix + (key,)) if prefix else key
        else:
            yield from _paths(node, prefix + (key,))


class _Complement(Selection):
    def __init__(self, inner: Selection):
        self._inner = inner

    def __contains__(self, address):
        # The whole sub-tree is in the complement only if the inner selects none of it.
        return not self._inner._any_below(address)

    def _any_below(self, address):
        return address not in self._inner

    def _named_paths(self):
        return self._inner._named_paths()

    def submap(self, key):
        return _Complement(self._inner.submap(key))

    def __repr__(self):
        return f"~{self._inner!r}"


class _Union(Selection):
    def __init__(self, a: Selection, b: Selection):
        self._a, self._b = a, b

    def __contains__(self, address):
        return address in self._a or address in self._b

    def _any_below(self, address):
        return self._a._any_below(address) or self._b._any_below(address)

    def _named_paths(self):
        return self._a._named_paths() + self._b._named_paths()

    def submap(self, key):
        return _Union(self._a.submap(key), self._b.submap(key))

    def __repr__(self):
        return f"({self._a!r} | {self._b!r})"


def select(*addresses) -> Selection:
    """The selection of the given addresses (strings or tuple paths)."""
    trie: dict = {}
    for address in addresses:
        path = normalize_address(address)
        if not path:
            return _ALL
        node = trie
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if nxt is True:
                break
            node = nxt
        else:
            node[path[-1]] = True
    return _AddressSel(trie)
