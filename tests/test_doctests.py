"""Every docstring example in the packages runs: examples are doctests."""

import doctest
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest

import inference
import ppl
import smc
import vi

MODULES = sorted(
    f"{pkg.__name__}.{info.name}"
    for pkg in (ppl, inference, smc, vi)
    for info in pkgutil.iter_modules(pkg.__path__)
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    globs = {"jax": jax, "jnp": jnp, "dist": dist, "ppl": ppl, "inference": inference, "smc": smc, "vi": vi}
    failures, attempted = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS, verbose=False)
    if attempted == 0:
        pytest.skip(f"{name} has no docstring examples")
    assert failures == 0


def test_the_public_modules_do_have_examples():
    with_examples = [
        name for name in MODULES
        if any(t.examples for t in doctest.DocTestFinder().find(importlib.import_module(name)))
    ]
    assert {"ppl._dsl", "ppl._choicemap", "ppl._vmap", "ppl._scan", "ppl._switch", "ppl._mask",
            "inference._importance", "vi._grad", "vi._objectives"} <= set(with_examples)
