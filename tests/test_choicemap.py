"""ChoiceMap and Selection: construction, lookup, pytree behaviour."""

import jax
import jax.numpy as jnp
import pytest

import ppl
from ppl import ChoiceMap, Selection, select


def test_nested_dicts_and_tuple_paths_agree():
    a = ChoiceMap({"x": 1.0, "sub": {"z": 2.0, "deeper": {"w": 3.0}}})
    b = ChoiceMap({"x": 1.0, ("sub", "z"): 2.0, ("sub", "deeper", "w"): 3.0})
    assert a.addresses() == b.addresses() == [("sub", "deeper", "w"), ("sub", "z"), ("x",)]
    assert a["sub", "deeper", "w"] == b[("sub", "deeper", "w")] == 3.0
    assert isinstance(a["sub"], ChoiceMap) and a["sub"]["z"] == 2.0
    assert ("sub", "z") in a and "y" not in a and ("x", "nope") not in a


def test_missing_address_is_keyerror_with_suggestion():
    cm = ChoiceMap({"slope": 1.0})
    with pytest.raises(KeyError, match="Did you mean 'slope'"):
        cm["slop"]
    assert cm.get("slop", 5) == 5


def test_pytree_roundtrip_and_vmap():
    cm = ChoiceMap({"x": jnp.ones(3), "sub": {"z": jnp.zeros(3)}})
    leaves, treedef = jax.tree.flatten(cm)
    assert len(leaves) == 2
    back = jax.tree.unflatten(treedef, leaves)
    assert back.addresses() == cm.addresses()
    summed = jax.vmap(lambda c: c["x"] + c["sub", "z"])(cm)
    assert summed.shape == (3,)
    leaf = ChoiceMap.leaf(jnp.array(2.0))
    assert jax.jit(lambda c: c[()] * 2)(leaf) == 4.0


def test_merge_filter_and_immutability():
    a = ChoiceMap({"x": 1.0, "sub": {"z": 2.0}})
    b = a.merge({"sub": {"w": 3.0}, "x": 4.0})
    assert b["x"] == 4.0 and b["sub", "z"] == 2.0 and b["sub", "w"] == 3.0
    assert a["x"] == 1.0
    assert b.filter(select(("sub", "w"))).addresses() == [("sub", "w")]
    with pytest.raises(AttributeError):
        a.foo = 1


def test_duplicate_key_in_literal_is_an_error():
    with pytest.raises(ppl.AddressError, match="twice"):
        ChoiceMap({"sub": {"z": 1.0}, ("sub", "z"): 2.0})


def test_selection_algebra():
    sel = select("a", ("sub", "z"))
    assert "a" in sel and ("sub", "z") in sel and "b" not in sel
    assert "z" in sel.submap("sub") and "w" not in sel.submap("sub")
    assert "b" in ~sel and "a" not in ~sel
    assert "anything" in Selection.all() and "a" not in Selection.none()
    assert "b" in (sel | select("b"))
    # selecting a whole sub-tree selects everything below it
    assert ("sub", "any", "depth") in select("sub")


def test_complement_of_a_composite_selection_keeps_partial_subtrees_partial():
    sel = ~(select(("sub", "z")) | select("a"))
    assert ("sub",) not in sel  # part of 'sub' (its 'z') is excluded
    assert "w" in sel.submap("sub") and "z" not in sel.submap("sub")
    cm = ChoiceMap({"sub": {"z": 1.0, "w": 2.0}, "a": 3.0, "b": 4.0})
    assert cm.filter(sel).addresses() == [("b",), ("sub", "w")]
    assert "x" in ~~select("x") and "y" not in ~~select("x")
